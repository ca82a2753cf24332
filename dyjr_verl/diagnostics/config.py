"""The top-level ``diagnostics:`` node and when the old-log-prob probe can run."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from dyjr_verl.replay.config import Checker, ConfigNode

__all__ = ["DiagnosticsConfig", "bypass_mode", "probe_unsupported"]


def _select(config: Any, key: str, default: Any = None) -> Any:
    from omegaconf import OmegaConf

    return OmegaConf.select(config, key, default=default)


_PAD_TO_LENGTH_KEYS = (
    "actor_rollout_ref.actor.pad_to_length",
    "actor_rollout_ref.actor.megatron.pad_to_length",
    "actor_rollout_ref.actor.veomni.pad_to_length",
)


@dataclass
class DiagnosticsConfig(ConfigNode):
    """The top-level ``diagnostics:`` node, read by every dyjr_verl trainer mode (``sync_rank_k``
    for GRPO and every method of :mod:`dyjr_verl.methods`).

    rank_k: log ``rank_k/p1`` .. ``p{rank_k}``, ``rank_k/top{rank_k}_mass`` and ``rank_k/entropy``
        per step: the mean probability of the Rank-i token over the step's response positions,
        computed in verl's old-log-prob forward (no extra pass; absent in rollout-correction bypass
        mode, where that forward does not run). 0 turns it off.
    """

    default_path: ClassVar[str] = "diagnostics"

    rank_k: int = 8

    def check(self, c: Checker) -> None:
        c.ge("rank_k", self.rank_k, 0)
        if c.ok("rank_k") and self.rank_k > 64:
            c.error("rank_k", f"must be <= 64, got {self.rank_k}")


def bypass_mode(config: Any) -> bool:
    """verl's rollout-correction bypass mode: old log-probs = rollout log-probs, no forward runs."""
    corr = _select(config, "algorithm.rollout_correction", default=None)
    return bool(corr and corr.get("bypass_mode", False))

def probe_unsupported(config: Any) -> str | None:
    """Why the old-log-prob probe (Rank-k metrics, a top-k record; dyjr_verl/diagnostics/probe.py)
    cannot run with this config; None when it can."""
    for key in _PAD_TO_LENGTH_KEYS:
        if _select(config, key, default=False):
            return f"{key}=true (padded sequences do not reach the logits processor unpadded)"
    if bypass_mode(config):
        return "algorithm.rollout_correction.bypass_mode=true (no old-log-prob forward runs)"
    strategy = _select(config, "actor_rollout_ref.actor.strategy", default="fsdp")
    if str(strategy) not in ("fsdp", "fsdp2"):
        return f"actor strategy {strategy!r} (the logits processor needs the FSDP engine)"
    if _select(config, "actor_rollout_ref.model.use_fused_kernels", default=False):
        return "actor_rollout_ref.model.use_fused_kernels=true (fused kernels produce no logits)"
    if _select(config, "distillation.enabled", default=False):
        return "distillation.enabled=true (verl's distillation loss owns the logits processor)"
    return None
