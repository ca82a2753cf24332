"""DyJR's divergence terms: the sampled-token Jensen-Shannon generator (DPH-RL's ``js_low_var``)
and the forward-KL variant, as replay terms (the same f_JS as a registered verl policy loss:
:mod:`.policy_loss`).

For a token ``y`` drawn from a reference policy Q (here: the policy that generated a buffer
trajectory, whose log-prob ``l`` was stored) and the current policy P = pi_theta::

    u      = P(y) / Q(y) = exp(log pi_theta(y) - l)
    f_JS(u) = u log u - (u + 1) log((u + 1) / 2)
            = u (log 2 - softplus(-log u)) - (softplus(log u) - log 2)      # form used here

``E_{y~Q}[f_JS(P(y)/Q(y))] = KL(P||M) + KL(Q||M) = 2 JSD(P, Q)`` with M = (P + Q) / 2, so the
token mean of f_JS over stored tokens estimates twice the JS divergence from sampled tokens only
(no vocabulary, no reference model). f_JS is convex, f(1) = f'(1) = 0 (so f >= 0), f(0) = log 2.

Gradient: d f_JS / d log u = w(u) = u log(2u / (u + 1)) = u (log 2 - softplus(-log u)), so
``grad f = w(u) grad log pi_theta(y)``: w < 0 for u < 1 (raise the token's probability; bounded,
|w| <= 0.2325 with its extreme near u = 0.30, and w -> 0 as u -> 0: a saturating pull that fades
for abandoned tokens), w = 0 at u = 1, w > 0 for u > 1 (lower it; grows like u log 2).

Why the softplus form: it is written in log u, so it never forms u log u - (u+1) log(...) as a
difference of two large numbers, stays finite for log u -> -inf (f -> log 2) and is exact in fp32
for |log u| up to the clamp; inputs in bf16/fp16 are upcast to fp32 first.

Replay terms (registered in :mod:`dyjr_verl.replay.terms` on import): ``js`` (f_JS, default
coef 0.1) and ``forward_kl`` (u - 1 - log u, default coef 0.1), both without advantage;
:func:`dyjr_loss_spec` turns the ``dyjr.js`` node into the spec of the replay-aware loss.

Forward KL (DPH-RL's ``forward`` mode; DyJR's "Forward-kl" variant, ``dyjr.js.divergence=forward_kl``)
uses the same u and the same clamp with the low-variance generator::

    f_KL(u) = u - 1 - log u = expm1(log u) - log u                                # form used here

``E_{y~Q}[u - 1] = sum_y P(y) - 1 = 0``, so ``E_{y~Q}[f_KL(u)] = E_Q[log Q(y) - log P(y)] = KL(Q||P)``:
the stored-token mean estimates the forward (mass-covering) KL from the buffer policy to pi_theta.
f_KL is convex, f(1) = f'(1) = 0, f >= 0; near u = 1, f_KL ~ (u - 1)^2 / 2 while f_JS ~ (u - 1)^2 / 4,
so the same lambda is about twice as strong for small drift. Gradient: d f_KL / d log u = u - 1, in
[-1, inf): a pull that does *not* fade for abandoned tokens (u -> 0 gives weight -1; f grows like
-log u, at most 20 at the clamp), unlike f_JS.

Bounded weight (``dyjr.js.max_weight``, both divergences, sampled estimator)
------------------------------------------------------------------------------
On the u > 1 side both weights grow without bound: w_JS ~ 1e2 at log u = 5, 1.5e4 at 10, 3e8 at the
clamp; w_KL = u - 1. One token whose probability rose far above its stored one (a rare sampled token,
the vLLM-vs-trainer numeric tail) would then outweigh thousands of PG tokens and, through the global
grad-norm clip, shrink the PG update as well. With the cap W the term continues linearly above the
knee b, the log u where w reaches W (:func:`weight_knee`)::

    f_W(log u) = f(log u)                       for log u <= b
               = f(b) + W (log u - b)           for log u >  b      (weight: min(w, W))

Value and gradient are continuous; f_W equals f below the knee, stays >= 0 with its minimum 0 at
u = 1, and its weight never decreases on the u > 1 side (convex in log u there); the
stored-token mean then underestimates the divergence only through tokens beyond the knee, which
``replay/u_max`` and ``replay/u_above_10`` (logged by the replay loss) show. Why W = 4 by default:
:class:`~dyjr_verl.methods.dyjr.config.JSConfig`. The cap lives in :class:`DivergenceSpec` (built by
:func:`dyjr_loss_spec`); a plain ``ReplayLossSpec(kind="js")`` has none.

Replay as policy gradient (the ``dyjr.replay.as_pg`` ablation: FIFO experience replay)
----------------------------------------------------------------------------------------
Replayed tokens get the clipped PPO term of verl's vanilla loss with u as the ratio and the
advantage the trajectory had when it was collected (stored with it)::

    pg(u, A) = max(-A u, -A clip(u, 1 - eps_low, 1 + eps_high))      and, for A < 0,  min(pg, -A c)

eps_low / eps_high / c are the actor's ``clip_ratio_low`` / ``clip_ratio_high`` / ``clip_ratio_c``
(:class:`ClippedPGSpec`, filled by :func:`dyjr_loss_spec`). verl's ``compute_policy_loss_vanilla``
returns only the aggregated loss, and the replay core aggregates a per-token matrix with the replay
normaliser, so the few lines of clipping are written here; a test checks them against verl's.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.nn.functional as F

from dyjr_verl.methods.dyjr.config import DEFAULT_MAX_WEIGHT
from dyjr_verl.replay.terms import DEFAULT_LOG_U_CLAMP, ReplayLossSpec, ReplayTermOutput, register_replay_term

__all__ = [
    "LOG2",
    "DEFAULT_LOG_U_CLAMP",
    "f_js",
    "f_js_from_log",
    "js_grad_weight",
    "js_grad_weight_from_log",
    "js_term",
    "f_forward_kl_from_log",
    "forward_kl_grad_weight_from_log",
    "DEFAULT_MAX_WEIGHT",
    "DivergenceSpec",
    "masked_log_u",
    "weight_knee",
    "capped_term",
    "CLIPPED_PG_TERM",
    "ClippedPGSpec",
    "clipped_pg_from_log",
    "actor_clip_bounds",
    "dyjr_loss_spec",
]

LOG2 = math.log(2.0)
#: log u below this is treated as u = 0 (exp underflows anyway); avoids 0 * inf = NaN.
_LOG_U_FLOOR = -1.0e4



def _as_compute_dtype(x: torch.Tensor) -> torch.Tensor:
    """fp32 for half-precision inputs (log-probs often arrive in bf16); keep fp32/fp64."""
    return x.float() if x.dtype in (torch.bfloat16, torch.float16) or not x.is_floating_point() else x


def f_js_from_log(log_u: torch.Tensor, clamp: Optional[float] = None) -> torch.Tensor:
    """f_JS(exp(log_u)) computed stably from log u; optional symmetric clamp of log u."""
    lu = _as_compute_dtype(log_u)
    lu = lu.clamp(min=_LOG_U_FLOOR) if clamp is None else lu.clamp(-clamp, clamp)
    u = torch.exp(lu)
    return u * (LOG2 - F.softplus(-lu)) - (F.softplus(lu) - LOG2)


def f_js(u: torch.Tensor) -> torch.Tensor:
    """f_JS(u) = u log u - (u+1) log((u+1)/2) for u >= 0 (u = 0 gives log 2)."""
    return f_js_from_log(torch.log(_as_compute_dtype(u)))


def js_grad_weight_from_log(log_u: torch.Tensor, clamp: Optional[float] = None) -> torch.Tensor:
    """w(u) = u log(2u/(u+1)) = d f_JS / d log u, the factor multiplying grad log pi_theta."""
    lu = _as_compute_dtype(log_u)
    lu = lu.clamp(min=_LOG_U_FLOOR) if clamp is None else lu.clamp(-clamp, clamp)
    return torch.exp(lu) * (LOG2 - F.softplus(-lu))


def js_grad_weight(u: torch.Tensor) -> torch.Tensor:
    """w(u) = u log(2u/(u+1)) for u >= 0 (w(0) = 0)."""
    return js_grad_weight_from_log(torch.log(_as_compute_dtype(u)))


def _clamped_log_u(log_u: torch.Tensor, clamp: Optional[float]) -> torch.Tensor:
    lu = _as_compute_dtype(log_u)
    return lu.clamp(min=_LOG_U_FLOOR) if clamp is None else lu.clamp(-clamp, clamp)


def f_forward_kl_from_log(log_u: torch.Tensor, clamp: Optional[float] = None) -> torch.Tensor:
    """f_KL(exp(log_u)) = u - 1 - log u; expm1 keeps it exact near u = 1 (no 1 - 1 cancellation)."""
    lu = _clamped_log_u(log_u, clamp)
    return torch.expm1(lu) - lu


def forward_kl_grad_weight_from_log(log_u: torch.Tensor, clamp: Optional[float] = None) -> torch.Tensor:
    """u - 1 = d f_KL / d log u, the factor multiplying grad log pi_theta."""
    return torch.expm1(_clamped_log_u(log_u, clamp))


def masked_log_u(
    log_prob: torch.Tensor,
    stored_log_prob: torch.Tensor,
    mask: Optional[torch.Tensor] = None,
    *,
    log_u_clamp: float = DEFAULT_LOG_U_CLAMP,
) -> torch.Tensor:
    """log u = log_prob - stored_log_prob, clamped, and 0 where masked (set *before* any exp, which
    keeps padding garbage, inf/NaN, out of values and gradients); fp32 for half-precision inputs."""
    lp = _as_compute_dtype(log_prob)
    st = _as_compute_dtype(stored_log_prob.detach()).to(lp.dtype)
    log_u = lp - st
    if mask is not None:
        keep = mask.bool()
        log_u = torch.where(keep, log_u, torch.zeros_like(log_u))
    return log_u.clamp(-log_u_clamp, log_u_clamp)


def js_term(
    log_prob: torch.Tensor,
    stored_log_prob: torch.Tensor,
    mask: Optional[torch.Tensor] = None,
    *,
    log_u_clamp: float = DEFAULT_LOG_U_CLAMP,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token f_JS(u), u = exp(log_prob - stored_log_prob), and the clamped log u.

    Args:
        log_prob: current log pi_theta of the sampled tokens, (bsz, T); carries the gradient.
        stored_log_prob: log-probs recorded when the tokens were sampled, (bsz, T); detached.
        mask: tokens to keep, (bsz, T), bool or 0/1; masked positions get log u = 0, so f = 0
            (:func:`masked_log_u`).
        log_u_clamp: symmetric clamp of log u (see :data:`DEFAULT_LOG_U_CLAMP`).

    Returns:
        (term, log_u), both fp32 (or fp64 for fp64 inputs), shape (bsz, T), zero where masked.
    """
    log_u = masked_log_u(log_prob, stored_log_prob, mask, log_u_clamp=log_u_clamp)
    return f_js_from_log(log_u), log_u


#: each divergence's (value, gradient weight) as functions of log u
_DIVERGENCES = {"js": (f_js_from_log, js_grad_weight_from_log),
                "forward_kl": (f_forward_kl_from_log, forward_kl_grad_weight_from_log)}


@functools.lru_cache(maxsize=None)
def weight_knee(divergence: str, max_weight: float) -> float:
    """The log u > 0 where ``divergence``'s gradient weight reaches ``max_weight`` (> 0)."""
    if divergence == "forward_kl":
        return math.log1p(max_weight)  # u - 1 = W
    # w_JS is increasing for u > 1 and u log 2 - 1 <= w < u log 2, so the root lies in this bracket
    lo, hi = math.log(max_weight / LOG2), math.log((max_weight + 1) / LOG2)
    weight = _DIVERGENCES[divergence][1]
    for _ in range(100):  # bisection to float precision; runs once per (divergence, W)
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if float(weight(torch.tensor(mid, dtype=torch.float64))) < max_weight else (lo, mid)
    return hi


def capped_term(divergence: str, log_u: torch.Tensor, max_weight: Optional[float]) -> tuple[torch.Tensor, torch.Tensor]:
    """(f_W(log u), its gradient weight detached): the divergence continued linearly above the
    knee with slope ``max_weight`` (module docstring); the plain term for ``max_weight=None``."""
    f, w = _DIVERGENCES[divergence]
    if max_weight is None:
        return f(log_u), w(log_u.detach())
    knee = weight_knee(divergence, float(max_weight))
    below = log_u.clamp(max=knee)
    knee_t = torch.tensor(knee, dtype=below.dtype, device=below.device)
    above = f(knee_t) + w(knee_t) * (log_u - knee)  # w(knee) = max_weight up to float rounding
    return torch.where(log_u > knee, above, f(below)), w(below.detach())


@dataclass(frozen=True)
class DivergenceSpec(ReplayLossSpec):
    """The replay spec plus the cap on one token's gradient weight (``dyjr.js.max_weight``; None: no cap)."""

    max_weight: Optional[float] = DEFAULT_MAX_WEIGHT

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.max_weight is not None and not (math.isfinite(self.max_weight) and self.max_weight > 0):
            raise ValueError(f"DivergenceSpec.max_weight must be a finite number > 0 or None, got {self.max_weight!r}")


@register_replay_term("js", default_coef=0.1, default_normalizer="separate")
def _js_replay_term(log_u, advantages, mask, spec, extra) -> ReplayTermOutput:
    """DyJR: f_JS(u) on replayed tokens (capped weight with a :class:`DivergenceSpec`); no advantage."""
    value, weight = capped_term("js", log_u, getattr(spec, "max_weight", None))
    return ReplayTermOutput(value * mask, weight)


@register_replay_term("forward_kl", default_coef=0.1, default_normalizer="separate")
def _forward_kl_replay_term(log_u, advantages, mask, spec, extra) -> ReplayTermOutput:
    """DyJR (forward KL): u - 1 - log u on replayed tokens (capped weight with a :class:`DivergenceSpec`)."""
    value, weight = capped_term("forward_kl", log_u, getattr(spec, "max_weight", None))
    return ReplayTermOutput(value * mask, weight)


CLIPPED_PG_TERM = "clipped_pg"


@dataclass(frozen=True)
class ClippedPGSpec(ReplayLossSpec):
    """The replay spec plus the actor's PPO clip bounds (the core passes the spec to its term as is).
    Defaults are verl's: clip_ratio 0.2 both sides, dual-clip constant 3."""

    clip_low: float = 0.2
    clip_high: float = 0.2
    clip_c: float = 3.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if not (0 <= self.clip_low < 1 and self.clip_high >= 0 and self.clip_c > 1):
            raise ValueError(f"clip bounds need 0 <= clip_low < 1, clip_high >= 0, clip_c > 1; got "
                             f"{self.clip_low}, {self.clip_high}, {self.clip_c}")


def clipped_pg_from_log(log_u: torch.Tensor, advantages: torch.Tensor, clip_low: float, clip_high: float,
                        clip_c: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token clipped PG loss (the module docstring's pg(u, A)) and whether the clip or the dual
    clip is active (detached; the gradient is zero there)."""
    ratio = torch.exp(_clamped_log_u(log_u, None))
    adv = advantages.to(ratio.dtype)
    unclipped = -adv * ratio
    clipped = -adv * ratio.clamp(1 - clip_low, 1 + clip_high)
    ppo = torch.maximum(unclipped, clipped)
    dual = -adv * clip_c
    dual_active = (adv < 0) & (ppo > dual)
    loss = torch.where(dual_active, dual, ppo)
    return loss, ((clipped > unclipped) | dual_active).detach()


@register_replay_term(CLIPPED_PG_TERM, default_coef=1.0, default_normalizer="separate", needs_advantages=True)
def _clipped_pg_replay_term(log_u, advantages, mask, spec, extra) -> ReplayTermOutput:
    """DyJR with ``replay.as_pg``: -A * clip(u) on replayed tokens, A stored with the trajectory;
    the diagnostic weight is the share of clipped tokens."""
    if not isinstance(spec, ClippedPGSpec):
        raise TypeError(f"replay term {CLIPPED_PG_TERM!r} needs a ClippedPGSpec (the actor's clip bounds), got "
                        f"{type(spec).__name__}")
    adv = torch.where(mask, advantages.to(log_u.dtype), torch.zeros_like(log_u))
    loss, active = clipped_pg_from_log(log_u, adv, spec.clip_low, spec.clip_high, spec.clip_c)
    return ReplayTermOutput(loss * mask, active.to(log_u.dtype))


def actor_clip_bounds(actor: Any) -> dict[str, float]:
    """clip_low / clip_high / clip_c of verl's actor config, resolved as ``compute_policy_loss_vanilla``
    resolves them (``clip_ratio_low/high`` default to ``clip_ratio``; ``clip_ratio_c`` to 3)."""
    def get(name: str, default: Any) -> Any:
        value = actor.get(name, default) if hasattr(actor, "get") else getattr(actor, name, default)
        return default if value is None else value

    ratio = float(get("clip_ratio", 0.2))
    return {"clip_low": float(get("clip_ratio_low", ratio)), "clip_high": float(get("clip_ratio_high", ratio)),
            "clip_c": float(get("clip_ratio_c", 3.0))}


def dyjr_loss_spec(cfg: Any, actor: Any = None, **overrides: Any) -> ReplayLossSpec:
    """The replay-aware loss's spec from a :class:`~dyjr_verl.methods.dyjr.config.DyJRConfig` (or its
    ``js`` node): ``js.divergence`` picks the term (``js`` | ``forward_kl``), ``js.estimator=topk``
    the exact top-k JS (JS only; ``JSConfig.check`` refuses it with forward_kl), and
    ``replay.as_pg`` the clipped PG term with ``actor``'s clip bounds (verl's actor config; needed
    then) and the same coef, clamp and normaliser. The sampled terms get a :class:`DivergenceSpec`
    carrying ``js.max_weight``."""
    js = getattr(cfg, "js", cfg)
    kind = getattr(js, "divergence", "js")
    if getattr(getattr(cfg, "replay", None), "as_pg", False):
        if actor is None:
            raise ValueError("dyjr.replay.as_pg needs the actor config (its clip_ratio_low/high/c)")
        if getattr(js, "estimator", "sampled") != "sampled":  # a node built in code skips DyJRConfig.check
            raise ValueError(f"dyjr.replay.as_pg replaces the divergence, not with dyjr.js.estimator={js.estimator}")
        kwargs = dict(kind=CLIPPED_PG_TERM, coef=js.coef, log_u_clamp=js.log_u_clamp, normalizer=js.normalizer,
                      **actor_clip_bounds(actor))
        kwargs.update(overrides)
        return ClippedPGSpec(**kwargs)
    topk = getattr(js, "estimator", "sampled") == "topk"
    if topk:
        if kind != "js":  # a node built in code skips JSConfig.check: refuse here as well
            raise ValueError(f"dyjr.js.estimator=topk computes JS only, not dyjr.js.divergence={kind}")
        from dyjr_verl.methods.dyjr.topk import TOPK_JS_TERM  # registers the term

        kind = TOPK_JS_TERM
    kwargs = dict(kind=kind, coef=js.coef, log_u_clamp=js.log_u_clamp, normalizer=js.normalizer)
    if not topk:  # the sampled terms' weight cap (the exact top-k JS has a bounded gradient)
        kwargs["max_weight"] = getattr(js, "max_weight", DEFAULT_MAX_WEIGHT)
    kwargs.update(overrides)
    return ReplayLossSpec(**kwargs) if topk else DivergenceSpec(**kwargs)

