"""Ex-GRPO's loss on replayed tokens: ``-A * w / (w + beta)``, ``w = pi_theta / pi_recorded``,
beta = 0.1, unclipped (the ``shaped_pg`` replay term), one joint token normaliser by default.
Fresh tokens keep verl's ``ppo_loss`` (:mod:`dyjr_verl.replay.loss`)."""

from __future__ import annotations

import math

import torch

from dyjr_verl.methods.exgrpo.config import ExGRPOConfig
from dyjr_verl.replay.terms import ReplayLossSpec, ReplayTermOutput, register_replay_term

__all__ = ["SHAPED_PG_TERM", "exgrpo_loss_spec"]

SHAPED_PG_TERM = "shaped_pg"


@register_replay_term(SHAPED_PG_TERM, default_coef=1.0, default_normalizer="joint", needs_advantages=True)
def _shaped_pg_replay_term(log_u, advantages, mask, spec, extra) -> ReplayTermOutput:
    """-A * u/(u+beta), written as sigmoid(log u - log beta) (stable for any log u)."""
    shaped = torch.sigmoid(log_u - math.log(spec.beta))
    adv = torch.where(mask, advantages.to(shaped.dtype), torch.zeros_like(shaped))
    return ReplayTermOutput(-adv * shaped * mask, shaped.detach())


def exgrpo_loss_spec(cfg: ExGRPOConfig) -> ReplayLossSpec:
    """Replayed tokens: ``-A * w/(w + beta)`` (the ``shaped_pg`` replay term), one joint normaliser."""
    loss = cfg.loss
    return ReplayLossSpec(
        kind=SHAPED_PG_TERM, coef=loss.coef, beta=loss.beta, log_u_clamp=loss.log_u_clamp, normalizer=loss.normalizer
    )
