"""The replay-term registry: what replayed tokens get in the replay-aware loss (:mod:`.loss`).

A method registers its term with :func:`register_replay_term` when its module is imported; the
core loss knows no term by name. A term that needs more than ``log u`` (e.g. per-token values
computed by a logits processor) reads them from the call's ``extra`` mapping, which the loss
passes through from its caller.
"""

from __future__ import annotations

import functools
import importlib
import math
from dataclasses import dataclass
from typing import Any, Callable, Mapping, NamedTuple, Optional

import torch

__all__ = [
    "DEFAULT_LOG_U_CLAMP",
    "NORMALIZERS",
    "ReplayTermOutput",
    "ReplayTermDef",
    "REPLAY_TERMS",
    "register_replay_term",
    "get_replay_term",
    "ReplayLossSpec",
    "make_replay_loss_fn",
]

#: |log u| bound: matches verl's ratio clamp; f_JS(e^20) ~ 3.4e8 stays finite in fp32 and bf16
DEFAULT_LOG_U_CLAMP = 20.0
NORMALIZERS = ("separate", "joint")
_NORMALIZERS = NORMALIZERS


class ReplayTermOutput(NamedTuple):
    """``loss_mat``: per-token loss (bsz, T) with grad, zero off-mask. ``weight``: a detached
    per-token diagnostic reported as ``replay/weight_mean``."""

    loss_mat: torch.Tensor
    weight: torch.Tensor


#: fn(log_u, advantages, mask, spec, extra) -> ReplayTermOutput. ``log_u`` = log pi_theta - stored,
#: fp32, clamped to +-spec.log_u_clamp, zero off-mask, carrying the gradient of log pi_theta;
#: ``extra``: what the loss's caller passed (e.g. a logits processor's per-token output).
ReplayTermFn = Callable[
    [torch.Tensor, Optional[torch.Tensor], torch.Tensor, "ReplayLossSpec", Mapping[str, Any]], ReplayTermOutput
]


@dataclass(frozen=True)
class ReplayTermDef:
    fn: ReplayTermFn
    default_coef: float
    default_normalizer: str
    needs_advantages: bool


REPLAY_TERMS: dict[str, ReplayTermDef] = {}


def register_replay_term(
    name: str, *, default_coef: float, default_normalizer: str = "separate", needs_advantages: bool = False
) -> Callable[[ReplayTermFn], ReplayTermFn]:
    """Decorator adding a replay term; re-registering a name rebinds it (module reloads)."""
    if default_normalizer not in _NORMALIZERS:
        raise ValueError(f"default_normalizer must be one of {_NORMALIZERS}, got {default_normalizer!r}")

    def deco(fn: ReplayTermFn) -> ReplayTermFn:
        REPLAY_TERMS[name] = ReplayTermDef(fn, float(default_coef), default_normalizer, needs_advantages)
        return fn

    return deco


def get_replay_term(name: str) -> ReplayTermDef:
    try:
        return REPLAY_TERMS[name]
    except KeyError:
        raise ValueError(f"unknown replay term {name!r}; registered: {sorted(REPLAY_TERMS)}") from None


@dataclass(frozen=True)
class ReplayLossSpec:
    """What the replay rows get. Frozen and module-level, so ``functools.partial`` pickles it.

    kind: a :data:`REPLAY_TERMS` name (registered by a method: ``js``, ``forward_kl``, ``topk_js``,
        ``shaped_pg``).
    coef: multiplier of the replay term; None = the term's default.
    beta: shaping constant of ``shaped_pg``.
    log_u_clamp: symmetric clamp of log u before the term.
    normalizer: ``separate`` | ``joint`` | None (= the term's default). See
        :mod:`dyjr_verl.replay.loss`.
    strict: raise when ``replay_mask`` or a needed normaliser field is missing (a silently
        dropped field otherwise turns DyJR into plain PPO). With strict=False a missing
        ``replay_mask`` means "all fresh" and missing normaliser fields mean ``joint``.
    metric_prefix: prefix of the returned metric keys.
    """

    kind: str
    coef: Optional[float] = None
    beta: float = 0.1
    log_u_clamp: float = DEFAULT_LOG_U_CLAMP
    normalizer: Optional[str] = None
    strict: bool = True
    metric_prefix: str = "replay/"
    #: the module that registers ``kind`` (filled in here): a worker process that unpickles the spec
    #: imports it, so the term is registered there too
    term_module: str = ""

    def __post_init__(self) -> None:
        object.__setattr__(self, "term_module", get_replay_term(self.kind).fn.__module__)
        if self.coef is not None and not (math.isfinite(self.coef) and self.coef >= 0):
            raise ValueError(f"ReplayLossSpec.coef must be a finite number >= 0, got {self.coef!r}")
        if not (math.isfinite(self.beta) and self.beta > 0):
            raise ValueError(f"ReplayLossSpec.beta must be > 0, got {self.beta!r}")
        if not (self.log_u_clamp > 0):
            raise ValueError(f"ReplayLossSpec.log_u_clamp must be > 0, got {self.log_u_clamp!r}")
        if self.normalizer is not None and self.normalizer not in _NORMALIZERS:
            raise ValueError(f"ReplayLossSpec.normalizer must be one of {_NORMALIZERS} or None, got {self.normalizer!r}")

    @property
    def term(self) -> ReplayTermDef:
        if self.kind not in REPLAY_TERMS and self.term_module:
            importlib.import_module(self.term_module)
        return get_replay_term(self.kind)

    @property
    def resolved_coef(self) -> float:
        return self.term.default_coef if self.coef is None else float(self.coef)

    @property
    def resolved_normalizer(self) -> str:
        return self.term.default_normalizer if self.normalizer is None else self.normalizer


def make_replay_loss_fn(config: Any, spec: ReplayLossSpec) -> functools.partial:
    """The picklable ``partial`` to hand to ``set_loss_fn``."""
    from dyjr_verl.replay.loss import replay_aware_loss

    return functools.partial(replay_aware_loss, config=config, spec=spec)
