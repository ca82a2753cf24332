"""Typed, validated ``rlep:`` and ``exgrpo:`` config nodes (same machinery as ``dyjr:``).

Both nodes are top-level for the reason given in :mod:`dyjr_verl.config` (verl's dataclass nodes
reject unknown keys). They are validated once at start-up by the recipes' hydra callback
(:mod:`dyjr_verl.preflight`) and again when the trainer is built; every bad value is one line
naming its full key. :func:`verl_config_problems` adds the checks that need the rest of verl's
config (K = ``rollout.n``, the pool file, no critic).

Defaults are the papers' (method.md sections 4 and 5)::

    rlep:
      enable: true
      pool_path: ???           # parquet written by `python -m dyjr_verl.baselines.rlep_collect`
      replay_per_group: 2      # M stored successes appended to every group of G fresh rollouts
      min_correct: 2           # pool admission: >= 2 correct answers of N samples
      rescore: true            # replayed answers are scored by verl's reward workers
      append_eos: true         # stored strings are re-tokenised and end with EOS (official code)
      seed: 0

    exgrpo:
      enable: true
      start_accuracy: 0.35     # replay starts once a step's fresh-rollout accuracy exceeds this
      replay: {size: 0.5, min_buffer: 0, seed: 0}   # size = rho, share of the batch's questions
      pool: {lbound: 0, rbound: null, logprobs: old, max_per_question: 0, correct_threshold: 0.5}
      select: {weighting: normal, sigma: 1.0, trajectory: min_entropy, max_candidates: 0}
      loss: {beta: 0.1, coef: 1.0, normalizer: joint, log_u_clamp: 20.0}
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal, Optional

from dyjr_verl.config import Checker, ConfigError, ConfigNode, ReplayConfig

__all__ = [
    "RLEPConfig",
    "ExGRPOPoolConfig",
    "ExGRPOSelectConfig",
    "ExGRPOLossConfig",
    "ExGRPOConfig",
    "METHOD_NODES",
    "verl_config_problems",
]


# ------------------------------------------------------------------------------------------------
# RLEP
# ------------------------------------------------------------------------------------------------


@dataclass
class RLEPConfig(ConfigNode):
    """RLEP (arXiv 2507.07451): static pool of verified answers, M replayed per group.

    pool_path: the experience pool (parquet of question_key -> candidate strings).
    replay_per_group: M; a question with fewer candidates gets fewer rows, never fillers.
    min_correct: questions need at least this many stored answers to be replayed.
    rescore: score replayed answers with verl's reward workers (as RLEP's DAPO reward manager
        re-scores all G+M rows); false trusts the collection's verdict (score 1.0).
    append_eos: end each re-tokenised answer with the EOS token (the official data loader does).
    seed: seed of the candidate draws.
    """

    default_path: ClassVar[str] = "rlep"

    enable: bool = True
    pool_path: Optional[str] = None
    replay_per_group: int = 2
    min_correct: int = 2
    rescore: bool = True
    append_eos: bool = True
    seed: int = 0

    def check(self, c: Checker) -> None:
        c.ge("replay_per_group", self.replay_per_group, 1)
        c.ge("min_correct", self.min_correct, 1)
        if c.ok("enable", "pool_path") and self.enable and (not self.pool_path or self.pool_path == "???"):
            c.error("pool_path", "must be set (build the pool with `python -m dyjr_verl.baselines.rlep_collect`)")


# ------------------------------------------------------------------------------------------------
# Ex-GRPO
# ------------------------------------------------------------------------------------------------


@dataclass
class ExGRPOPoolConfig(ConfigNode):
    """What enters Ex-GRPO's pool (see :class:`dyjr_verl.replay.pools.ExperiencePool`).

    lbound, rbound: a group with k correct of K stores its correct trajectories iff
        lbound < k <= rbound; rbound null means K-1. k = K retires the question.
    logprobs: which recorded log-probs replayed tokens are compared with: ``old`` = the
        trainer's log-probs of the rollout policy computed at rollout time (the official code's
        choice; no inference/training engine mismatch) or ``rollout`` = vLLM's sampling log-probs.
    max_per_question: cap on stored trajectories per question, oldest dropped (0 = no cap).
    correct_threshold: a rollout is correct when its score exceeds this.
    """

    default_path: ClassVar[str] = "exgrpo.pool"

    lbound: int = 0
    rbound: Optional[int] = None
    logprobs: Literal["old", "rollout"] = "old"
    max_per_question: int = 0
    correct_threshold: float = 0.5

    def check(self, c: Checker) -> None:
        c.ge("lbound", self.lbound, 0)
        if self.rbound is not None:
            c.ge("rbound", self.rbound, 1)
            if c.ok("lbound", "rbound") and self.lbound >= self.rbound:
                c.error("lbound", f"must be < {c.key('rbound')} ({self.rbound}), got {self.lbound}")
        c.ge("max_per_question", self.max_per_question, 0)
        c.finite("correct_threshold", self.correct_threshold)


@dataclass
class ExGRPOSelectConfig(ConfigNode):
    """Which questions and which of their trajectories are replayed.

    weighting: bucket weights: ``normal`` N(k; K/2, sigma) (Ex-GRPO), ``linear`` k/K, ``sqrt``,
        ``uniform``.
    sigma: standard deviation of the ``normal`` weighting.
    trajectory: ``min_entropy`` (lowest mean token entropy under the current policy: one batched
        forward pass over the candidates, Ex-GRPO's choice), ``random`` or ``latest`` (no forward).
    max_candidates: score only the most recent N stored trajectories of a question (0 = all).
    """

    default_path: ClassVar[str] = "exgrpo.select"

    weighting: Literal["normal", "linear", "sqrt", "uniform"] = "normal"
    sigma: float = 1.0
    trajectory: Literal["min_entropy", "random", "latest"] = "min_entropy"
    max_candidates: int = 0

    def check(self, c: Checker) -> None:
        if c.finite("sigma", self.sigma):
            c.gt("sigma", self.sigma, 0)
        c.ge("max_candidates", self.max_candidates, 0)


@dataclass
class ExGRPOLossConfig(ConfigNode):
    """Loss on replayed tokens: ``-A * f(w)``, ``f(w) = w / (w + beta)``, ``w = pi_theta / pi_recorded``,
    unclipped (the ``shaped_pg`` replay term of :mod:`dyjr_verl.losses.replay_loss`).

    normalizer: ``joint`` (one token count for fresh and replayed tokens, as Ex-GRPO) or
        ``separate``. Dr.GRPO-style aggregation is verl's own setting:
        ``actor.loss_agg_mode=seq-mean-token-sum-norm`` and ``algorithm.norm_adv_by_std_in_grpo=false``
        (the ``exgrpo_math`` recipe uses it); the replay term follows ``loss_agg_mode``.
    """

    default_path: ClassVar[str] = "exgrpo.loss"

    beta: float = 0.1
    coef: float = 1.0
    normalizer: Literal["joint", "separate"] = "joint"
    log_u_clamp: float = 20.0

    def check(self, c: Checker) -> None:
        if c.finite("beta", self.beta):
            c.gt("beta", self.beta, 0)
        if c.finite("coef", self.coef):
            c.ge("coef", self.coef, 0)
        if c.finite("log_u_clamp", self.log_u_clamp):
            c.gt("log_u_clamp", self.log_u_clamp, 0)


def _exgrpo_replay_default() -> ReplayConfig:
    return ReplayConfig(size=0.5, min_buffer=0, seed=0)


@dataclass
class ExGRPOConfig(ConfigNode):
    """Ex-GRPO (arXiv 2510.02245).

    start_accuracy: replay starts after the first step whose fresh-rollout accuracy exceeds this
        (0.35) and stays on.
    replay.size: rho. A float is the share of each batch's questions that are experience
        questions (each: K-1 fresh rollouts + 1 replayed trajectory); an int is their number.
        Capped by the pool. replay.min_buffer: pool questions needed before replay starts.
    """

    default_path: ClassVar[str] = "exgrpo"

    enable: bool = True
    start_accuracy: float = 0.35
    replay: ReplayConfig = field(default_factory=_exgrpo_replay_default)
    pool: ExGRPOPoolConfig = field(default_factory=ExGRPOPoolConfig)
    select: ExGRPOSelectConfig = field(default_factory=ExGRPOSelectConfig)
    loss: ExGRPOLossConfig = field(default_factory=ExGRPOLossConfig)

    def check(self, c: Checker) -> None:
        if c.finite("start_accuracy", self.start_accuracy):
            c.ge("start_accuracy", self.start_accuracy, 0)
            c.le("start_accuracy", self.start_accuracy, 1)

    def num_experience_questions(self, batch_questions: int) -> int:
        size = self.replay.size
        n = int(math.floor(size * batch_questions)) if isinstance(size, float) else int(size)
        return max(0, min(n, batch_questions))


#: top-level node name -> its config class (dyjr is registered by preflight itself)
METHOD_NODES: dict[str, type[ConfigNode]] = {"rlep": RLEPConfig, "exgrpo": ExGRPOConfig}


# ------------------------------------------------------------------------------------------------
# checks against the rest of verl's config
# ------------------------------------------------------------------------------------------------


def _select(config: Any, key: str, default: Any = None) -> Any:
    from omegaconf import OmegaConf

    return OmegaConf.select(config, key, default=default)


def verl_config_problems(name: str, node: ConfigNode, config: Any) -> list[str]:
    """One line per setting of ``node`` (already parsed) that contradicts verl's ``config``."""
    problems: list[str] = []
    estimator = str(_select(config, "algorithm.adv_estimator", "grpo"))
    if estimator == "gae" or bool(_select(config, "critic.enable", False)):
        problems.append(
            f"{name}: replayed rows join their prompt's group, which needs a critic-free group estimator "
            f"(e.g. algorithm.adv_estimator=grpo), got adv_estimator={estimator}"
        )
    if isinstance(node, RLEPConfig) and node.enable and node.pool_path:
        path = str(node.pool_path)
        if "://" not in path and not Path(path).expanduser().exists():
            problems.append(
                f"rlep.pool_path does not exist: {path} (build it with `python -m dyjr_verl.baselines.rlep_collect`)"
            )
    if isinstance(node, RLEPConfig) and node.enable and _select(config, "algorithm.rollout_correction.bypass_mode", False):
        problems.append(
            "rlep: algorithm.rollout_correction.bypass_mode=true uses rollout log-probs as old log-probs, "
            "which replayed answers do not have (RLEP recomputes them with the current policy)"
        )
    if isinstance(node, ExGRPOConfig):
        n = _select(config, "actor_rollout_ref.rollout.n", None)
        if n is not None:
            n = int(n)
            if n < 2:
                problems.append(f"exgrpo needs actor_rollout_ref.rollout.n >= 2 (K-1 fresh + 1 replayed), got {n}")
            elif node.pool.rbound is not None and node.pool.rbound > n - 1:
                problems.append(f"exgrpo.pool.rbound must be <= rollout.n - 1 ({n - 1}), got {node.pool.rbound}")
            elif node.pool.rbound is None and node.pool.lbound >= n - 1:
                problems.append(f"exgrpo.pool.lbound must be < rollout.n - 1 ({n - 1}), got {node.pool.lbound}")
    return problems


def parse_node(name: str, node: Any) -> ConfigNode:
    """Parse the top-level node ``name`` (raises :class:`ConfigError`)."""
    try:
        cls = METHOD_NODES[name]
    except KeyError:
        raise ConfigError([f"{name}: no such method node; known: {sorted(METHOD_NODES)}"]) from None
    return cls.from_omegaconf(node, path=name)
