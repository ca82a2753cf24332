"""verl v1 trainer modes: ``dyjr``, ``rlep``, ``exgrpo`` (one replay framework, :mod:`.replay_trainer`).

verl's v1 trainer package is imported *before* any submodule here. The plugin registers our
trainer modes right after ``verl.trainer.ppo.v1`` finishes importing; if one of our modules were
first to trigger that import, the hook would run while that module is only half initialised and
the baselines' ``from .replay_trainer import ...`` would fail (a circular import).
"""

import verl.trainer.ppo.v1  # noqa: F401  (see above: import order matters)
