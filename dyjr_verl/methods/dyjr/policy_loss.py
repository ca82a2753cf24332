"""The ``dyjr_js`` policy loss: DyJR's f_JS anchor (:mod:`.divergence`) registered in verl's own
policy-loss registry, for users who compose it into their own verl trainers.

Without DyJR's buffer and trainer, the same f_JS anchor can be added to any verl 0.9.1 run through
verl's policy-loss registry::

    actor_rollout_ref.actor.policy_loss.loss_mode=dyjr_js
    algorithm.rollout_correction.bypass_mode=true      # old_log_prob := the rollout log-probs
    actor_rollout_ref.rollout.calculate_log_probs=true
    +ray_kwargs.ray_init.runtime_env.env_vars.DYJR_JS_COEF='0.1'   # lambda (default 0.1)
    +ray_kwargs.ray_init.runtime_env.env_vars.DYJR_JS_MAX_WEIGHT='4'   # weight cap (default 4; 'none': off)

The loss is verl's vanilla clipped PG plus ``lambda * f_JS(exp(log_prob - old_log_prob))`` on
*all* response tokens, aggregated like every verl loss (``global_batch_info``). f_JS has the same
bounded gradient weight as DyJR's replay term (``dyjr.js.max_weight``, default 4: above the knee the
term continues linearly, :func:`~dyjr_verl.methods.dyjr.divergence.capped_term`), so one token whose
probability rose far above the sampler's cannot outweigh the batch's policy gradient. It needs the
``dyjr_verl`` plugin installed (``import verl`` registers it in every process) and old log-probs
that are *not* the current policy's: bypass mode (above) anchors the update to the sampling
policy, and with ``ppo_epochs > 1`` or several mini-batches the later ones are anchored to the
step's start; with freshly recomputed old log-probs the term is zero on the first mini-batch.
lambda and the cap come from the environment variables ``DYJR_JS_COEF`` and ``DYJR_JS_MAX_WEIGHT``:
registry losses receive only verl's ``ActorConfig``, which rejects extra keys, so an env var is the
only channel that needs no verl change. Per-row replay masks and stored log-probs (DyJR proper) need the replay-aware engine loss
(:mod:`dyjr_verl.replay.loss`) instead.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from typing import Any, Optional

import torch

from dyjr_verl.methods.dyjr.config import DEFAULT_MAX_WEIGHT
from dyjr_verl.methods.dyjr.divergence import capped_term, masked_log_u, weight_knee

__all__ = ["JS_COEF_ENV", "JS_MAX_WEIGHT_ENV", "DEFAULT_JS_COEF", "DYJR_JS_LOSS_NAME", "js_coef_from_env",
           "js_max_weight_from_env", "compute_policy_loss_dyjr_js", "register_policy_losses"]

JS_COEF_ENV = "DYJR_JS_COEF"
JS_MAX_WEIGHT_ENV = "DYJR_JS_MAX_WEIGHT"
DEFAULT_JS_COEF = 0.1
DYJR_JS_LOSS_NAME = "dyjr_js"


def js_coef_from_env(env: Optional[Mapping[str, str]] = None) -> float:
    """lambda for the registry loss, from ``$DYJR_JS_COEF`` (default 0.1); must be finite >= 0.
    ``env``: where to read it (default ``os.environ``; start-up checks pass Ray's runtime env)."""
    raw = (os.environ if env is None else env).get(JS_COEF_ENV)
    if raw is None or str(raw).strip() == "":
        return DEFAULT_JS_COEF
    try:
        coef = float(raw)
    except ValueError:
        raise ValueError(f"{JS_COEF_ENV} must be a number >= 0, got {raw!r}") from None
    if not (math.isfinite(coef) and coef >= 0.0):
        raise ValueError(f"{JS_COEF_ENV} must be a finite number >= 0, got {raw!r}")
    return coef


def js_max_weight_from_env(env: Optional[Mapping[str, str]] = None) -> Optional[float]:
    """The cap on one token's gradient weight, from ``$DYJR_JS_MAX_WEIGHT``: default
    :data:`~dyjr_verl.methods.dyjr.config.DEFAULT_MAX_WEIGHT`, ``none`` for no cap, else finite > 0."""
    raw = str((os.environ if env is None else env).get(JS_MAX_WEIGHT_ENV) or "").strip()
    if raw == "":
        return DEFAULT_MAX_WEIGHT
    if raw.lower() == "none":
        return None
    try:
        cap = float(raw)
    except ValueError:
        cap = math.nan
    if not (math.isfinite(cap) and cap > 0.0):
        raise ValueError(f"{JS_MAX_WEIGHT_ENV} must be a finite number > 0 or 'none', got {raw!r}")
    return cap


def compute_policy_loss_dyjr_js(
    old_log_prob: torch.Tensor,
    log_prob: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    loss_agg_mode: str = "token-mean",
    config: Any = None,
    rollout_is_weights: Optional[torch.Tensor] = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, dict[str, Any]]:
    """verl vanilla clipped PG + lambda * agg(f_JS(exp(log_prob - old_log_prob))) on all tokens,
    f_JS with its gradient weight capped at ``$DYJR_JS_MAX_WEIGHT`` (default 4).

    Aggregated with ``agg_loss(..., **config.global_batch_info)`` like every verl loss, so the
    accumulated gradient does not depend on the micro-batch split or the dp size. Rollout IS
    weights apply to the PG part only (the JS term is a regulariser, not an estimator of the
    return).
    """
    from verl.trainer.ppo.core_algos import agg_loss, compute_policy_loss_vanilla

    pg_loss, metrics = compute_policy_loss_vanilla(
        old_log_prob=old_log_prob,
        log_prob=log_prob,
        advantages=advantages,
        response_mask=response_mask,
        loss_agg_mode=loss_agg_mode,
        config=config,
        rollout_is_weights=rollout_is_weights,
    )
    coef, max_weight = js_coef_from_env(), js_max_weight_from_env()
    mask = response_mask.bool()
    log_u = masked_log_u(log_prob, old_log_prob, mask)
    term, _ = capped_term("js", log_u, max_weight)
    batch_info = dict(getattr(config, "global_batch_info", None) or {})
    js_loss = agg_loss(loss_mat=term, loss_mask=mask, loss_agg_mode=loss_agg_mode, **batch_info)
    with torch.no_grad():
        n = mask.sum().clamp(min=1)
        metrics = dict(metrics)
        metrics["actor/js_term"] = (term * mask).sum().div(n).item()  # local token mean of f_JS
        metrics["actor/js_u_mean"] = (torch.exp(log_u) * mask).sum().div(n).item()
        metrics["actor/js_coef"] = coef
        metrics["actor/js_u_max"] = float(torch.exp(log_u.masked_fill(~mask, -math.inf).max())) if mask.any() else 0.0
        if max_weight is not None:  # tokens beyond the knee: their weight is the cap, not f_JS's
            metrics["actor/js_capped_frac"] = ((log_u > weight_knee("js", max_weight)) & mask).sum().div(n).item()
    return pg_loss + coef * js_loss.to(pg_loss.dtype), metrics


def register_policy_losses() -> list[str]:
    """Register ``dyjr_js`` in verl's policy-loss registry (idempotent; safe to call repeatedly).

    verl's ``register_policy_loss`` silently overwrites, so re-registration after a module reload
    simply rebinds the name to the current function object.
    """
    from verl.trainer.ppo.core_algos import POLICY_LOSS_REGISTRY, register_policy_loss

    if POLICY_LOSS_REGISTRY.get(DYJR_JS_LOSS_NAME) is not compute_policy_loss_dyjr_js:
        register_policy_loss(DYJR_JS_LOSS_NAME)(compute_policy_loss_dyjr_js)
    return [DYJR_JS_LOSS_NAME]


register_policy_losses()
