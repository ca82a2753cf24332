"""The replay baselines DyJR is compared with, on the same replay framework as DyJR:

* RLEP (arXiv 2507.07451): offline collection (:mod:`.rlep_collect`) + ``trainer.v1.trainer_mode=rlep``
  (:mod:`dyjr_verl.trainer.rlep`);
* Ex-GRPO (arXiv 2510.02245): ``trainer.v1.trainer_mode=exgrpo`` (:mod:`dyjr_verl.trainer.exgrpo`).

Settings: :mod:`.config`; pools: :mod:`dyjr_verl.replay.pools`; documentation: ``docs/baselines.md``.
"""
