"""DyJR's typed ``dyjr:`` node: the buffer, the divergence term and the replay share.

Example YAML (all keys optional; these are the defaults)::

    dyjr:
      enable: true
      buffer: {max_age: 4, capacity: null, window: fixed, min_age: 1,
               drift_high: 0.2, drift_low: 0.05, shrink_step: 1, grow_step: 1, grow_patience: 2,
               admit: correct, admit_threshold: null, correct_threshold: 0.5, frozen: false, logprobs: rollout}
      js: {coef: 0.1, divergence: js, estimator: sampled, topk_k: 8, log_u_clamp: 20.0, max_weight: 4.0,
           normalizer: separate}
      replay: {size: 0.125, min_buffer: 0, seed: null, resume_empty: false, as_pg: false}

Two ablations are settings of the same trainer: ``buffer.frozen`` (a static reference: the buffer
is filled once from the start model; tests "dynamic") and ``replay.as_pg`` (replayed rows through a
clipped policy-gradient term instead of the divergence; tests "regularise, don't re-train").
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal, Optional

from dyjr_verl.replay.config import Checker, ConfigNode, ReplayConfig
from dyjr_verl.replay.stored_logprobs import LOGPROBS_FIELDS, stored_logprobs_problems, stored_logprobs_warnings

__all__ = ["BufferConfig", "JSConfig", "DyJRReplayConfig", "DyJRConfig", "PG_ADVANTAGE_ESTIMATORS",
           "DEFAULT_MAX_WEIGHT", "resolved_capacity"]

#: verl advantage estimators that give one advantage per trajectory (outcome-level: the same value on
#: every response token), the only kind ``replay.as_pg`` can store as a scalar
PG_ADVANTAGE_ESTIMATORS = ("grpo", "grpo_vectorized", "grpo_passk", "rloo", "rloo_vectorized", "opo", "gpg")
#: ``js.max_weight``'s default (its docstring entry says why 4)
DEFAULT_MAX_WEIGHT = 4.0


@dataclass
class BufferConfig(ConfigNode):
    """Time-Sensitive Dynamic Buffer (see :mod:`dyjr_verl.methods.dyjr.buffer` for exact semantics).

    max_age: largest window W in training steps; an entry pushed at step s is alive at step t
        iff ``t - s <= W``.
    capacity: hard bound on stored trajectories; null (default): ``max_age`` x the rollouts of one
        step (``data.train_batch_size`` x ``rollout.n``; frozen: one step), so the age window, not
        the count, decides what is kept (``plan`` shows the value). On overflow the oldest step
        loses a random (seeded by the replay seed) subset of its rows, never the last-pushed ones
        by position (verl's batch balancing orders them).
    window: ``fixed`` (W = max_age) or ``adaptive`` (W moves in [min_age, max_age] by drift).
    min_age: smallest window the adaptive rule may shrink to.
    drift_high / drift_low: adaptive thresholds on drift = mean |log pi_theta - stored| over
        replayed tokens; above ``drift_high`` W shrinks by ``shrink_step``; after
        ``grow_patience`` consecutive reports below ``drift_low`` W grows by ``grow_step``.
    admit: ``correct`` (reward > correct_threshold), ``all``, or ``threshold``
        (reward >= admit_threshold).
    frozen: a static reference (ablation of "dynamic"; DPH-RL's reference): the trajectories
        admitted at the first training step that admits any (the start model's rollouts when step 1
        has an admitted one) are stored and the buffer never changes after that: nothing is pushed, nothing is evicted, ages grow. Frozen, each
        setting means: ``admit`` / ``admit_threshold`` / ``correct_threshold`` choose what the
        fill keeps; ``capacity`` bounds the fill (an overflowing first step keeps a random seeded
        subset of ``capacity`` admitted rows); ``max_age`` is not used (no age eviction; ``plan`` warns when
        it is not the default); ``window`` must be ``fixed`` (an adaptive window would evict: refused),
        so ``min_age``, ``drift_*``, ``shrink_step``, ``grow_*`` are unused as with any fixed window.
        A fill smaller than one step's replay rows is drawn with replacement (the replay share stays
        DyJR's); each step that admits nothing before the fill is warned, and the fill waits for
        the next (under a sparse reward the start model's first step often has no correct answer).
    logprobs: what each stored token's log-prob l is (u = pi_theta / exp(l)): ``rollout`` = vLLM's
        log-prob of the token as it was sampled (``rollout_log_probs``, after temperature, top-k and
        top-p), so E_{y~Q}[f(u)] is exactly the divergence to the sampling policy Q; needs
        ``actor_rollout_ref.rollout.calculate_log_probs=true`` (verl's default). ``old`` = verl's
        recomputed log-prob of the rollout policy (``old_log_probs``: the trainer's engine and
        numerics, as pi_theta; temperature applied, no top-k/top-p), so an unchanged policy gives
        u = 1 exactly and the drift read by the adaptive window has no vLLM-vs-trainer noise floor;
        not with rollout-correction bypass mode (verl then does not recompute it: refused). With
        ``rollout`` and top_p < 1 or top_k > 0 vLLM renormalises over the kept tokens, so every
        replayed token has u < 1 and is pulled up (sharpening): ``plan`` and start-up warn.
    """

    default_path: ClassVar[str] = "dyjr.buffer"

    max_age: int = 4
    capacity: Optional[int] = None
    window: Literal["fixed", "adaptive"] = "fixed"
    min_age: int = 1
    drift_high: float = 0.2
    drift_low: float = 0.05
    shrink_step: int = field(default=1, metadata={"help": "steps W shrinks by when drift exceeds drift_high"})
    grow_step: int = field(default=1, metadata={"help": "steps W grows by after grow_patience calm reports"})
    grow_patience: int = field(default=2, metadata={"help": "consecutive reports below drift_low before W grows"})
    admit: Literal["correct", "all", "threshold"] = "correct"
    admit_threshold: Optional[float] = field(default=None, metadata={"help": "admit=threshold admits rewards >= this"})
    correct_threshold: float = field(default=0.5, metadata={"help": "admit=correct admits rewards above this"})
    frozen: bool = False
    logprobs: Literal["rollout", "old"] = "rollout"

    @property
    def logprobs_field(self) -> str:
        """The step's field whose values are stored as each token's log-prob."""
        return LOGPROBS_FIELDS[self.logprobs]

    def check(self, c: Checker) -> None:
        if c.ok("frozen", "window") and self.frozen and self.window == "adaptive":
            c.error("window", "must be 'fixed' with frozen=true (an adaptive window evicts, a frozen buffer never "
                    "does), got 'adaptive'")
        c.ge("max_age", self.max_age, 1)
        if self.capacity is not None:
            c.ge("capacity", self.capacity, 1)
        c.ge("min_age", self.min_age, 1)
        if c.ok("min_age", "max_age") and self.min_age > self.max_age:
            c.error("min_age", f"must be <= {c.key('max_age')} ({self.max_age}), got {self.min_age}")
        if c.finite("drift_high", self.drift_high):
            c.gt("drift_high", self.drift_high, 0)
        if c.finite("drift_low", self.drift_low):
            c.ge("drift_low", self.drift_low, 0)
        if c.ok("drift_low", "drift_high") and self.drift_low >= self.drift_high:
            c.error("drift_low", f"must be < {c.key('drift_high')} ({self.drift_high}), got {self.drift_low}")
        c.ge("shrink_step", self.shrink_step, 1)
        c.ge("grow_step", self.grow_step, 1)
        c.ge("grow_patience", self.grow_patience, 1)
        c.finite("correct_threshold", self.correct_threshold)
        if self.admit_threshold is not None:
            c.finite("admit_threshold", self.admit_threshold)
        elif c.ok("admit", "admit_threshold") and self.admit == "threshold":
            c.error("admit_threshold", "must be set when admit is 'threshold'")


def resolved_capacity(buffer: BufferConfig, rows_per_step: Optional[int]) -> Optional[int]:
    """``buffer.capacity``, or for null ``max_age`` (frozen: 1) x ``rows_per_step`` (the rollouts of
    one step, as ``plan`` counts them); None when neither is known (then only ages bound the buffer)."""
    if buffer.capacity is not None:
        return int(buffer.capacity)
    if rows_per_step is None:
        return None
    return (1 if buffer.frozen else int(buffer.max_age)) * max(1, int(rows_per_step))


@dataclass
class JSConfig(ConfigNode):
    """The divergence regulariser on replayed tokens (see :mod:`dyjr_verl.methods.dyjr.divergence`). The node
    keeps its name ``js`` for compatibility whichever divergence it selects.

    coef: lambda >= 0 multiplying the replay term.
    divergence: ``js`` (f_JS(u), estimating 2 JSD(pi_theta, pi_stored)) or ``forward_kl``
        (u - 1 - log u, estimating KL(pi_stored || pi_theta); DyJR's forward-KL variant). For
        small drift the KL term is about twice the JS one at the same coef.
    estimator: ``sampled`` (f_JS of the sampled token's probability ratio; unbiased, noisy) or
        ``topk`` (exact JS over the stored top-k support {top-k ids} + {rest}, recorded in the
        old-log-prob pass; needs that pass -- no rollout-correction bypass mode -- and the FSDP
        engine without fused kernels; see docs/topk.md).
    topk_k: ids per position stored with each trajectory for ``topk`` (``6k + 2`` bytes/token).
    log_u_clamp: log u = log pi_theta - stored is clamped to [-c, c] before f_JS; 20 matches
        verl's own ratio clamp and keeps f_JS finite (f_JS(e^20) ~ 3.4e8) in fp32 and bf16;
        gradients are zero beyond the clamp.
    max_weight: cap on one replayed token's gradient weight w = d f / d log u on the u > 1 side
        (``sampled`` estimator, both divergences; null: no cap). Uncapped, f_JS's weight
        u log(2u / (u + 1)) is ~1e2 at log u = 5, 1.5e4 at 10 and 3e8 at the clamp (forward KL: u - 1),
        so one token whose probability rose far above its stored one (a rare sampled token, the
        vLLM-vs-trainer numeric tail) can outweigh thousands of policy-gradient tokens and, through
        the global grad-norm clip, shrink the PG update. Above the log u where w reaches the cap
        (u ~ 7.1 for JS, 5 for forward KL at the default) the term continues linearly in log u with
        slope ``max_weight``: value and gradient continuous, f >= 0, nothing changes below.
        Default 4: with ``coef`` 0.1, the default share of 1/8 and the ``separate`` normaliser, a
        replayed token counts coef x fresh/replay tokens ~ 0.8 times a fresh token, so a capped token
        weighs at most ~3 PG tokens of |A x ratio| = 1, about the largest GRPO token weight (|A| <= 2.5
        with 8 rollouts, ratio <= 1 + clip_ratio_high). Scale it with share / coef to keep that.
        ``replay/u_max`` and ``replay/u_above_10`` show how often it binds.
    normalizer: ``separate`` (replay tokens normalised by the replay-token count and fresh tokens
        by the fresh count of the mini-batch) or ``joint`` (verl's one count for both).
    """

    default_path: ClassVar[str] = "dyjr.js"

    coef: float = 0.1
    divergence: Literal["js", "forward_kl"] = "js"
    estimator: Literal["sampled", "topk"] = "sampled"
    topk_k: int = 8
    log_u_clamp: float = 20.0
    max_weight: Optional[float] = DEFAULT_MAX_WEIGHT
    normalizer: Literal["separate", "joint"] = "separate"

    def check(self, c: Checker) -> None:
        if c.finite("coef", self.coef):
            c.ge("coef", self.coef, 0)
        if c.finite("log_u_clamp", self.log_u_clamp):
            c.gt("log_u_clamp", self.log_u_clamp, 0)
        if self.max_weight is not None and c.finite("max_weight", self.max_weight):
            c.gt("max_weight", self.max_weight, 0)
        if c.ok("max_weight", "estimator") and self.estimator == "topk" and self.max_weight != DEFAULT_MAX_WEIGHT:
            c.error("max_weight", f"caps the sampled estimator's weight; the exact top-k JS ({c.key('estimator')}=topk) "
                    f"has a bounded gradient and would ignore it: leave it at {DEFAULT_MAX_WEIGHT}")
        c.ge("topk_k", self.topk_k, 1)
        if c.ok("divergence", "estimator") and self.estimator == "topk" and self.divergence != "js":
            c.error("divergence", f"{self.divergence} has no top-k estimator (the stored top-k record gives "
                    f"exact JS only): use {c.key('estimator')}=sampled, got estimator 'topk'")


@dataclass
class DyJRReplayConfig(ReplayConfig):
    # The shared node plus DyJR's own switch, as a subclass: the key path stays ``dyjr.replay.as_pg``
    # and the core node (also RLEP's and Ex-GRPO's) does not learn a DyJR-only setting. The
    # docstring extends the base's, whose entries document the inherited keys (settings docs).
    __doc__ = (ReplayConfig.__doc__ or "") + """
    as_pg: ablation of "regularise, don't re-train" (FIFO experience replay): replayed rows get the
        clipped policy-gradient term ``-A * clip(u, 1 - clip_ratio_low, 1 + clip_ratio_high)``
        (PPO-style, as verl's vanilla loss, dual clip included) instead of the divergence; u = pi_theta /
        pi_stored, A = the trajectory's advantage at the step it was collected (stored with it).
        Same buffer, placement, ``js.coef`` (the replay term's weight), ``js.normalizer`` and
        ``js.log_u_clamp``; ``js.divergence`` must stay ``js`` and ``js.estimator`` ``sampled``;
        needs an outcome-level advantage estimator (one value per trajectory, e.g. grpo).
    """

    as_pg: bool = False


@dataclass
class DyJRConfig(ConfigNode):
    """The whole ``dyjr:`` node. ``DyJRConfig.from_omegaconf(cfg.get("dyjr"))`` at start-up."""

    default_path: ClassVar[str] = "dyjr"

    enable: bool = field(default=True, metadata={"help": "false: the dyjr trainer mode runs plain GRPO"})
    buffer: BufferConfig = field(default_factory=BufferConfig)
    js: JSConfig = field(default_factory=JSConfig)
    replay: DyJRReplayConfig = field(default_factory=DyJRReplayConfig)

    def check(self, c: Checker) -> None:
        # the ablation switches change nothing when they cannot act: refuse instead of ignoring them
        if not self.enable:
            for key, on in (("buffer.frozen", self.buffer.frozen), ("replay.as_pg", self.replay.as_pg)):
                if on:
                    c.error(key, "has no effect with dyjr.enable=false (plain GRPO, no buffer): drop it")
        if self.replay.as_pg:
            js = self.js
            if js.estimator != "sampled":
                c.error("replay.as_pg", f"replaces the divergence term, so {c.key('js.estimator')}={js.estimator} "
                        "would be ignored (and its top-k record paid for): use estimator=sampled")
            if js.divergence != "js":
                c.error("replay.as_pg", f"replaces the divergence term, so {c.key('js.divergence')}={js.divergence} "
                        "would be ignored: leave it at js")
            if js.max_weight != DEFAULT_MAX_WEIGHT:
                c.error("replay.as_pg", f"replaces the divergence term, so {c.key('js.max_weight')}={js.max_weight} "
                        f"would be ignored (the PG ratio is clipped): leave it at {DEFAULT_MAX_WEIGHT}")
            if js.coef == 0:
                c.error("replay.as_pg", f"with {c.key('js.coef')}=0 trains nothing on replayed rows (that is the "
                        "lambda=0 ablation): drop as_pg or set coef > 0")

    def verl_problems(self, config: Any) -> list[str]:
        from omegaconf import OmegaConf

        from dyjr_verl.diagnostics.config import probe_unsupported

        problems = []
        why = probe_unsupported(config) if self.js.estimator == "topk" else None
        if why:
            problems.append(f"dyjr.js.estimator=topk needs verl's old-log-prob forward: not with {why}")
        estimator = str(OmegaConf.select(config, "algorithm.adv_estimator", default="grpo"))
        if self.enable and self.replay.as_pg and estimator not in PG_ADVANTAGE_ESTIMATORS:
            problems.append(f"dyjr.replay.as_pg stores one advantage per trajectory: it needs an outcome-level "
                            f"algorithm.adv_estimator ({', '.join(PG_ADVANTAGE_ESTIMATORS)}), got {estimator}")
        if self.enable:
            problems.extend(stored_logprobs_problems("dyjr.buffer.logprobs", self.buffer.logprobs, config))
        return problems

    def verl_warnings(self, config: Any) -> list[str]:
        """Settings that run but work against the method with the rest of verl's config (``plan`` and
        start-up print them)."""
        if not self.enable:
            return []
        return stored_logprobs_warnings("dyjr.buffer.logprobs", self.buffer.logprobs, config,
                                        "the divergence pulls it up (sharpening, against DyJR's aim; the drift "
                                        "never falls to 0)")

    def replay_fingerprint(self) -> dict[str, Any]:
        """What the stored rows mean and how they are laid out (:mod:`dyjr_verl.replay.checkpoint`):
        the top-k record's k, the field stored as log-prob, the values admitted with each row."""
        from dyjr_verl.methods.dyjr.buffer import TimeSensitiveBuffer  # imports this module

        return {"method": self.default_path, "store": TimeSensitiveBuffer.__name__,
                "record_k": self.js.topk_k if self.enable and self.js.estimator == "topk" else 0,
                "admitted_fields": ["advantages"] if self.replay.as_pg else [],
                "stored_log_probs": self.buffer.logprobs_field}
