"""Ex-GRPO's typed ``exgrpo:`` node (defaults are the paper's, method.md section 5)::

    exgrpo:
      enable: true
      start_accuracy: 0.35     # replay starts once a step's fresh-rollout accuracy exceeds this
      replay: {size: 0.5, min_buffer: 0, seed: null, resume_empty: false}   # size = rho, share of the batch's questions
      pool: {lbound: 0, rbound: null, logprobs: old, max_per_question: 0, correct_threshold: 0.5}
      select: {weighting: normal, sigma: 1.0, trajectory: min_entropy, max_candidates: 0}
      loss: {beta: 0.1, coef: 1.0, normalizer: joint, log_u_clamp: 20.0}
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal, Optional

from dyjr_verl.replay.config import Checker, ConfigNode, ReplayConfig, critic_free_problems
from dyjr_verl.replay.stored_logprobs import LOGPROBS_FIELDS, stored_logprobs_problems, stored_logprobs_warnings

__all__ = ["ExGRPOPoolConfig", "ExGRPOSelectConfig", "ExGRPOLossConfig", "ExGRPOConfig"]


@dataclass
class ExGRPOPoolConfig(ConfigNode):
    """What enters Ex-GRPO's pool (see :class:`dyjr_verl.methods.exgrpo.pool.ExperiencePool`).

    lbound, rbound: a group with k correct of K stores its correct trajectories iff
        lbound < k <= rbound; rbound null means K-1. k = K retires the question.
    logprobs: which recorded log-probs replayed tokens are compared with: ``old`` = the
        trainer's log-probs of the rollout policy computed at rollout time (the official code's
        choice; no inference/training engine mismatch; not with rollout-correction bypass mode,
        which recomputes none: refused) or ``rollout`` = vLLM's sampling log-probs (needs
        ``actor_rollout_ref.rollout.calculate_log_probs=true``: refused otherwise, never replaced by
        ``old``; with top_p < 1 or top_k > 0 they are renormalised over the kept tokens, so w is
        biased low on every replayed token: ``plan`` and start-up warn). Part of the pool's
        checkpoint fingerprint: a resume with the other choice is refused, and so is one from a
        checkpoint written before the fingerprint had it (resume that with the version that wrote
        it, or move its dyjr_replay_state.pkl away and set ``exgrpo.replay.resume_empty=true``).
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
    unclipped (the ``shaped_pg`` replay term of :mod:`dyjr_verl.methods.exgrpo.loss`).

    normalizer: ``joint`` (one token count for fresh and replayed tokens, as Ex-GRPO) or
        ``separate``. Dr.GRPO-style aggregation is verl's own setting:
        ``actor.loss_agg_mode=seq-mean-token-sum-norm`` and ``algorithm.norm_adv_by_std_in_grpo=false``
        (the ``exgrpo_math`` recipe uses it); the replay term follows ``loss_agg_mode``.
    """

    default_path: ClassVar[str] = "exgrpo.loss"

    beta: float = field(default=0.1, metadata={"help": "beta of f(w) = w / (w + beta)"})
    coef: float = field(default=1.0, metadata={"help": "coefficient of the replay term"})
    normalizer: Literal["joint", "separate"] = "joint"
    log_u_clamp: float = field(default=20.0, metadata={"help": "log w is clamped to [-c, c] before f(w)"})

    def check(self, c: Checker) -> None:
        if c.finite("beta", self.beta):
            c.gt("beta", self.beta, 0)
        if c.finite("coef", self.coef):
            c.ge("coef", self.coef, 0)
        if c.finite("log_u_clamp", self.log_u_clamp):
            c.gt("log_u_clamp", self.log_u_clamp, 0)


def _exgrpo_replay_default() -> ReplayConfig:
    return ReplayConfig(size=0.5, min_buffer=0)


@dataclass
class ExGRPOConfig(ConfigNode):
    """Ex-GRPO (arXiv 2510.02245).

    start_accuracy: replay starts after the first step whose fresh-rollout accuracy exceeds this
        (0.35) and stays on.
    replay.size: rho. A float is the share of each batch's questions that are experience
        questions (each: K-1 fresh rollouts + 1 replayed trajectory); an int is their number.
        Capped by the pool.
    replay.min_buffer: pool questions needed before replay starts.
    """

    default_path: ClassVar[str] = "exgrpo"

    enable: bool = field(default=True, metadata={"help": "false: the exgrpo trainer mode runs plain GRPO"})
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

    def replay_fingerprint(self) -> dict[str, Any]:
        """What the stored pool is (:mod:`dyjr_verl.replay.checkpoint`); Ex-GRPO records nothing per row."""
        from dyjr_verl.methods.exgrpo.pool import ExperiencePool

        return {"method": self.default_path, "store": ExperiencePool.__name__, "record_k": 0,
                "stored_log_probs": LOGPROBS_FIELDS[self.pool.logprobs]}

    def verl_problems(self, config: Any) -> list[str]:
        from omegaconf import OmegaConf

        problems = critic_free_problems("exgrpo", config)
        if self.enable:
            problems.extend(stored_logprobs_problems("exgrpo.pool.logprobs", self.pool.logprobs, config))
        n = OmegaConf.select(config, "actor_rollout_ref.rollout.n", default=None)
        if n is None:
            return problems
        n = int(n)
        if n < 2:
            problems.append(f"exgrpo needs actor_rollout_ref.rollout.n >= 2 (K-1 fresh + 1 replayed), got {n}")
        elif self.pool.rbound is not None and self.pool.rbound > n - 1:
            problems.append(f"exgrpo.pool.rbound must be <= rollout.n - 1 ({n - 1}), got {self.pool.rbound}")
        elif self.pool.rbound is None and self.pool.lbound >= n - 1:
            problems.append(f"exgrpo.pool.lbound must be < rollout.n - 1 ({n - 1}), got {self.pool.lbound}")
        return problems

    def verl_warnings(self, config: Any) -> list[str]:
        if not self.enable:
            return []
        return stored_logprobs_warnings("exgrpo.pool.logprobs", self.pool.logprobs, config,
                                        "Ex-GRPO's importance weight w is biased low on every replayed token, as "
                                        "if the policy had moved away from its experience")
