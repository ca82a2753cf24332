"""RLEP's typed ``rlep:`` node (defaults are the paper's, method.md section 4)::

    rlep:
      enable: true
      pool_path: ???           # parquet written by `python -m dyjr_verl.methods.rlep.collect`
      replay_per_group: 2      # M stored successes appended to every group of G fresh rollouts
      min_correct: 2           # pool admission: >= 2 correct answers of N samples
      rescore: true            # replayed answers are scored by verl's reward workers
      append_eos: true         # stored strings are re-tokenised and end with EOS (official code)
      seed: null               # null: the run's seed (data.seed, else actor_rollout_ref.rollout.seed)
      resume_empty: false
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Optional

from dyjr_verl.replay.config import Checker, ConfigNode, critic_free_problems

__all__ = ["RLEPConfig"]


@dataclass
class RLEPConfig(ConfigNode):
    """RLEP (arXiv 2507.07451): static pool of verified answers, M replayed per group.

    pool_path: the experience pool (parquet of question_key -> candidate strings).
    replay_per_group: M; a question with fewer candidates gets fewer rows, never fillers.
    min_correct: questions need at least this many stored answers to be replayed.
    rescore: score replayed answers with verl's reward workers (as RLEP's DAPO reward manager
        re-scores all G+M rows); false trusts the collection's verdict (score 1.0).
    append_eos: end each re-tokenised answer with the EOS token (the official data loader does).
    seed: seed of the candidate draws; null derives it from the run's seed (``data.seed``, else
        ``actor_rollout_ref.rollout.seed``), so runs with different seeds draw different answers.
    resume_empty: a resume from a verl checkpoint without replay state starts with a fresh draw
        stream (and a warning); false refuses it.
    """

    default_path: ClassVar[str] = "rlep"

    enable: bool = field(default=True, metadata={"help": "false: the rlep trainer mode runs plain GRPO"})
    pool_path: Optional[str] = None
    replay_per_group: int = 2
    min_correct: int = 2
    rescore: bool = True
    append_eos: bool = True
    seed: Optional[int] = None
    resume_empty: bool = False

    def check(self, c: Checker) -> None:
        c.ge("replay_per_group", self.replay_per_group, 1)
        c.ge("min_correct", self.min_correct, 1)
        if self.seed is not None:
            c.ge("seed", self.seed, 0)
        if c.ok("enable", "pool_path") and self.enable and (not self.pool_path or self.pool_path == "???"):
            c.error("pool_path", "must be set (build the pool with `python -m dyjr_verl.methods.rlep.collect`)")

    def replay_fingerprint(self) -> dict[str, Any]:
        """What the stored pool is (:mod:`dyjr_verl.replay.checkpoint`); RLEP records nothing per row."""
        from dyjr_verl.methods.rlep.pool import RLEPPool

        return {"method": self.default_path, "store": RLEPPool.__name__, "record_k": 0}

    def verl_problems(self, config: Any) -> list[str]:
        from omegaconf import OmegaConf

        problems = critic_free_problems("rlep", config)
        if self.enable and self.pool_path:
            path = str(self.pool_path)
            if "://" not in path and not Path(path).expanduser().exists():
                problems.append(
                    f"rlep.pool_path does not exist: {path} (build it with `python -m dyjr_verl.methods.rlep.collect`)"
                )
        if self.enable and OmegaConf.select(config, "algorithm.rollout_correction.bypass_mode", default=False):
            problems.append(
                "rlep: algorithm.rollout_correction.bypass_mode=true uses rollout log-probs as old log-probs, "
                "which replayed answers do not have (RLEP recomputes them with the current policy)"
            )
        return problems
