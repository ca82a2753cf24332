"""Replay-aware engine loss for verl 0.9.1 (installed with ``actor_rollout_wg.set_loss_fn``).

One framework for replay methods whose buffer rows get a *different* loss from fresh rows:

* fresh rows (``replay_mask == 0``) get exactly verl's ``ppo_loss`` (any ``loss_mode``; entropy
  bonus and KL loss keep working): ``ppo_loss`` runs on a shallow copy of the micro-batch whose
  ``response_mask`` is zeroed on replay rows;
* replay rows (``replay_mask == 1``) get only ``coef * agg_loss(term, replay_token_mask, ...)``,
  where ``term`` comes from a small registry (:data:`REPLAY_TERMS`):

  - ``js`` (DyJR, default coef 0.1): ``f_JS(u)``, ``u = exp(log pi_theta - stored)``; no advantage;
  - ``forward_kl`` (DyJR's forward-KL variant, default coef 0.1): ``u - 1 - log u``, whose mean
    over stored tokens estimates KL(pi_stored || pi_theta); no advantage;
  - ``shaped_pg`` (Ex-GRPO, default coef 1.0): ``-A * f(u)``, ``f(u) = u / (u + beta)``
    (= sigmoid(log u - log beta)), beta = 0.1, unclipped, using the row's ``advantages``.

Masks are per row (never per micro-batch), so verl's batch balancing / shuffling / dynamic
micro-batching may mix row types freely. All arithmetic is fp32 (log-probs often arrive in bf16).

Install (driver side, e.g. in a trainer's ``on_init_end``)::

    actor_cfg = omega_conf_to_dataclass(config.actor_rollout_ref.actor)
    spec = ReplayLossSpec.from_dyjr_config(DyJRConfig.from_omegaconf(config.get("dyjr")))
    actor_rollout_wg.set_loss_fn(make_replay_loss_fn(actor_cfg, spec))

Data contract (fields the trainer writes on EVERY row of the actor-update batch, fresh rows and
verl's padding rows included; pass ``fields=None`` or the new field list in ``KVBatchMeta`` or the
worker silently never sees them):

=============================  =====================  ==========================================
field                          dtype / layout         meaning
=============================  =====================  ==========================================
``replay_mask``                float32, dense (B,)    1.0 replay row, 0.0 fresh row (> 0.5 = replay)
``stored_log_probs``           float (bf16/fp32),     log-prob of each response token recorded
                               jagged nested,         when the row was *sampled* (buffer ``l_t``);
                               response length        fresh rows: a copy of their
                               (same lengths as       ``old_log_probs``/rollout log-probs (unused
                               ``response_mask``)     by the loss, present for a uniform schema)
``advantages``                 as verl (jagged)       replay rows need a value; ``js`` ignores it,
``old_log_probs``                                     ``shaped_pg`` uses it. ``ppo_loss`` reads
                                                      ``old_log_probs``/``advantages`` of every row
                                                      (masked out on replay rows), so replay rows
                                                      must carry finite values of the right length
``fresh_tokens_in_minibatch``  float32, dense (B,)    normaliser fields, see below
``replay_tokens_in_minibatch``
``fresh_seqs_in_minibatch``
``replay_seqs_in_minibatch``
=============================  =====================  ==========================================

Normalisers (``normalizer='separate'``, DyJR's default). verl's scalar ``batch_num_tokens`` counts
*all* response tokens of the optimizer mini-batch across dp ranks, and ``global_batch_size`` all
its rows; with replay rows mixed in they would dilute the fresh PG loss and vice versa. So the
trainer writes, on each row, the counts of the optimizer mini-batch that row is trained in, summed
over all dp ranks:

* ``fresh_tokens_in_minibatch`` / ``replay_tokens_in_minibatch``: sum of ``response_mask`` over
  fresh / replay rows (used by ``token-mean``);
* ``fresh_seqs_in_minibatch`` / ``replay_seqs_in_minibatch``: number of fresh / replay rows,
  padding rows counted as fresh, so the two add up to verl's ``global_batch_size`` (used by the
  ``seq-mean-*`` modes). ``token-sum`` needs neither.

The values must be identical on all rows of one mini-batch (checked per micro-batch). Fresh tokens
are then normalised by the fresh count and replay tokens by the replay count: the fresh part
equals ``ppo_loss`` on the fresh sub-mini-batch and the replay part ``coef * mean(term)`` over
replay tokens, and since both counts are mini-batch-global constants (times ``dp_size``, which
cancels FSDP's gradient averaging, as in ``agg_loss``) the accumulated gradient is the same for
every micro-batch split, row order and dp size. :func:`minibatch_normalizer_fields` computes the
fields: exact for verl's layout with ``actor.shuffle=False`` (the default: the batch is cut into
``dp`` contiguous chunks, each cut into contiguous mini-batches of ``mini_batch_size / dp`` rows),
or, with ``shuffle=True``, per-step means (constant over the step, still split-invariant).
A count of 0 is treated as 1 (its numerator is 0 too). ``normalizer='joint'`` (Ex-GRPO's single
normaliser) uses verl's scalars for both parts and needs no extra fields.

Metrics (keys prefixed ``replay/``; verl adds its ``actor/`` prefix when logging): ``rows``,
``tokens``, ``fresh_tokens`` (per-rank counts, summed over micro-batches), ``loss`` (coef x term)
and ``term`` (the aggregated replay term), ``coef``, and token means over replay tokens: ``u_mean``,
``u_outside`` (share of u outside [0.5, 2]), ``drift`` (mean |log u|, feed it to
``TimeSensitiveBuffer.report_drift``), ``weight_mean`` (``js``: mean gradient weight
w(u) = u log(2u/(u+1)); ``forward_kl``: mean u - 1; ``shaped_pg``: mean shaping f(u)). The token
means are exact mini-batch means when ``replay_tokens_in_minibatch`` is present (each micro-batch reports
``local_sum * dp_size / count`` with SUM aggregation); otherwise they are averages of
per-micro-batch means (micro-batches without replay tokens report 0).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any, Callable, NamedTuple, Optional

import torch
from tensordict import TensorDict

from dyjr_verl.losses.js import (
    DEFAULT_LOG_U_CLAMP,
    f_forward_kl_from_log,
    f_js_from_log,
    forward_kl_grad_weight_from_log,
    js_grad_weight_from_log,
)

__all__ = [
    "REPLAY_MASK_KEY",
    "STORED_LOG_PROBS_KEY",
    "FRESH_TOKENS_KEY",
    "REPLAY_TOKENS_KEY",
    "FRESH_SEQS_KEY",
    "REPLAY_SEQS_KEY",
    "NORMALIZER_KEYS",
    "ReplayTermOutput",
    "ReplayTermDef",
    "REPLAY_TERMS",
    "register_replay_term",
    "get_replay_term",
    "ReplayLossSpec",
    "replay_aware_loss",
    "make_replay_loss_fn",
    "minibatch_normalizer_fields",
]

REPLAY_MASK_KEY = "replay_mask"
STORED_LOG_PROBS_KEY = "stored_log_probs"
FRESH_TOKENS_KEY = "fresh_tokens_in_minibatch"
REPLAY_TOKENS_KEY = "replay_tokens_in_minibatch"
FRESH_SEQS_KEY = "fresh_seqs_in_minibatch"
REPLAY_SEQS_KEY = "replay_seqs_in_minibatch"
NORMALIZER_KEYS = (FRESH_TOKENS_KEY, REPLAY_TOKENS_KEY, FRESH_SEQS_KEY, REPLAY_SEQS_KEY)

_NORMALIZERS = ("separate", "joint")
_TOKEN_MODES = ("token-mean",)
_SEQ_MODES = ("seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm")


# ----------------------------------------------------------------------------------------------
# replay-term registry
# ----------------------------------------------------------------------------------------------


class ReplayTermOutput(NamedTuple):
    """``loss_mat``: per-token loss (bsz, T) with grad, zero off-mask. ``weight``: a detached
    per-token diagnostic reported as ``replay/weight_mean``."""

    loss_mat: torch.Tensor
    weight: torch.Tensor


#: fn(log_u, advantages, mask, spec) -> ReplayTermOutput. ``log_u`` = log pi_theta - stored,
#: fp32, clamped to +-spec.log_u_clamp, zero off-mask, carrying the gradient of log pi_theta.
ReplayTermFn = Callable[[torch.Tensor, Optional[torch.Tensor], torch.Tensor, "ReplayLossSpec"], ReplayTermOutput]


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


@register_replay_term("js", default_coef=0.1, default_normalizer="separate")
def _js_replay_term(log_u, advantages, mask, spec) -> ReplayTermOutput:
    """DyJR: f_JS(u) on replayed tokens; the advantage is not used."""
    loss_mat = f_js_from_log(log_u) * mask
    return ReplayTermOutput(loss_mat, js_grad_weight_from_log(log_u.detach()))


@register_replay_term("forward_kl", default_coef=0.1, default_normalizer="separate")
def _forward_kl_replay_term(log_u, advantages, mask, spec) -> ReplayTermOutput:
    """DyJR (forward KL): u - 1 - log u on replayed tokens; the advantage is not used."""
    loss_mat = f_forward_kl_from_log(log_u) * mask
    return ReplayTermOutput(loss_mat, forward_kl_grad_weight_from_log(log_u.detach()))


@register_replay_term("shaped_pg", default_coef=1.0, default_normalizer="joint", needs_advantages=True)
def _shaped_pg_replay_term(log_u, advantages, mask, spec) -> ReplayTermOutput:
    """Ex-GRPO: -A * u/(u+beta), written as sigmoid(log u - log beta) (stable for any log u)."""
    shaped = torch.sigmoid(log_u - math.log(spec.beta))
    adv = torch.where(mask, advantages.to(shaped.dtype), torch.zeros_like(shaped))
    return ReplayTermOutput(-adv * shaped * mask, shaped.detach())


# ----------------------------------------------------------------------------------------------
# spec
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ReplayLossSpec:
    """What the replay rows get. Frozen and module-level, so ``functools.partial`` pickles it.

    kind: a :data:`REPLAY_TERMS` name (``js`` | ``forward_kl`` | ``shaped_pg`` | ``topk_js``).
    coef: multiplier of the replay term; None = the term's default (js, forward_kl 0.1; shaped_pg 1.0).
    beta: shaping constant of ``shaped_pg``.
    log_u_clamp: symmetric clamp of log u before the term (see ``dyjr_verl.losses.js``).
    normalizer: ``separate`` | ``joint`` | None (= the term's default: js separate,
        shaped_pg joint). See the module docstring.
    strict: raise when ``replay_mask`` or a needed normaliser field is missing (a silently
        dropped field otherwise turns DyJR into plain PPO). With strict=False a missing
        ``replay_mask`` means "all fresh" and missing normaliser fields mean ``joint``.
    metric_prefix: prefix of the returned metric keys.
    """

    kind: str = "js"
    coef: Optional[float] = None
    beta: float = 0.1
    log_u_clamp: float = DEFAULT_LOG_U_CLAMP
    normalizer: Optional[str] = None
    strict: bool = True
    metric_prefix: str = "replay/"

    def __post_init__(self) -> None:
        get_replay_term(self.kind)
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
        return get_replay_term(self.kind)

    @property
    def resolved_coef(self) -> float:
        return self.term.default_coef if self.coef is None else float(self.coef)

    @property
    def resolved_normalizer(self) -> str:
        return self.term.default_normalizer if self.normalizer is None else self.normalizer

    @classmethod
    def from_dyjr_config(cls, cfg: Any, **overrides: Any) -> "ReplayLossSpec":
        """DyJR spec from a :class:`dyjr_verl.config.DyJRConfig` (or its ``js`` node):
        ``js.divergence`` picks the term (``js`` | ``forward_kl``), ``js.estimator=topk`` the
        exact top-k JS (JS only; ``JSConfig.check`` refuses it with forward_kl)."""
        js = getattr(cfg, "js", cfg)
        kind = getattr(js, "divergence", "js")
        if getattr(js, "estimator", "sampled") == "topk":
            if kind != "js":  # a node built in code skips JSConfig.check: refuse here as well
                raise ValueError(f"dyjr.js.estimator=topk computes JS only, not dyjr.js.divergence={kind}")
            import dyjr_verl.losses.topk_js  # noqa: F401  (registers the 'topk_js' term)

            kind = "topk_js"
        kwargs = dict(kind=kind, coef=js.coef, log_u_clamp=js.log_u_clamp, normalizer=js.normalizer)
        kwargs.update(overrides)
        return cls(**kwargs)


def make_replay_loss_fn(config: Any, spec: ReplayLossSpec) -> functools.partial:
    """The picklable ``partial`` to hand to ``set_loss_fn``."""
    return functools.partial(replay_aware_loss, config=config, spec=spec)


# ----------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------


def _non_tensor(data: TensorDict, key: str, default: Any) -> Any:
    from verl.utils import tensordict_utils as tu

    return tu.get_non_tensor_data(data=data, key=key, default=default)


def _row_flags(data: TensorDict, bsz: int) -> torch.Tensor:
    rm = data[REPLAY_MASK_KEY]
    if getattr(rm, "is_nested", False):
        raise ValueError(f"'{REPLAY_MASK_KEY}' must be a dense float32 (B,) tensor, got a nested tensor")
    rm = rm.reshape(bsz, -1)
    if rm.shape[1] != 1:
        raise ValueError(f"'{REPLAY_MASK_KEY}' must have shape (B,), got {tuple(data[REPLAY_MASK_KEY].shape)}")
    return rm[:, 0].float() > 0.5


def _minibatch_count(data: TensorDict, key: str) -> Optional[float]:
    """The (constant over the mini-batch) per-row count field, or None when absent."""
    if key not in data.keys():
        return None
    v = data[key]
    if getattr(v, "is_nested", False):
        raise ValueError(f"'{key}' must be a dense float32 (B,) tensor, got a nested tensor")
    v = v.detach().float().reshape(-1)
    if v.numel() == 0:
        return None
    lo, hi = float(v.min()), float(v.max())
    if hi - lo > 0.5:
        raise ValueError(
            f"'{key}' must be the same on every row of an optimizer mini-batch, got values in [{lo}, {hi}] "
            "inside one micro-batch (the trainer's mini-batch layout does not match verl's)"
        )
    return max(hi, 1.0)


def _zero_rows(mask: torch.Tensor, keep: list[bool]) -> torch.Tensor:
    """``mask`` (jagged nested or dense (B, T)) with the rows where ``keep`` is False zeroed."""
    if getattr(mask, "is_nested", False):
        rows = mask.unbind()
        return torch.nested.as_nested_tensor(
            [r if k else torch.zeros_like(r) for r, k in zip(rows, keep, strict=True)], layout=torch.jagged
        )
    keep_t = torch.tensor(keep, device=mask.device).reshape(-1, *([1] * (mask.dim() - 1)))
    return mask * keep_t.to(mask.dtype)


def _fit_width(x: torch.Tensor, width: int) -> torch.Tensor:
    """Right-pad with zeros / truncate a (B, T') tensor to (B, width)."""
    t = x.shape[1]
    if t == width:
        return x
    if t > width:
        return x[:, :width]
    return torch.nn.functional.pad(x, (0, width - t))


def _global_info_metric_type(dp_size: int, batch_num_tokens: Any, global_batch_size: Any, config: Any):
    from verl.utils.metric import AggregationType

    if dp_size > 1 or batch_num_tokens is not None or global_batch_size is not None or config.loss_scale_factor is not None:
        return AggregationType.SUM
    return AggregationType.MEAN


# ----------------------------------------------------------------------------------------------
# the loss
# ----------------------------------------------------------------------------------------------


def replay_aware_loss(
    config: Any,
    model_output: Any,
    data: TensorDict,
    dp_group: Any = None,
    *,
    spec: ReplayLossSpec = ReplayLossSpec(),
    **kwargs: Any,
) -> tuple[torch.Tensor, dict[str, Any]]:
    """verl ``ppo_loss`` on fresh rows + ``coef * agg(term)`` on replay rows (see module doc).

    Args:
        config: verl ``ActorConfig`` (bound with ``partial``); ``ppo_loss`` fills
            ``config.global_batch_info``.
        model_output: engine output; ``log_probs`` (jagged, full sequence), optional ``entropy``.
        data: the micro-batch TensorDict as verl's engine passes it.
        dp_group: forwarded to ``ppo_loss``.
        spec: replay term, coefficient and normaliser choice.

    Returns:
        (loss, metrics): loss already scaled for FSDP's per-micro-batch ``backward()``.
    """
    from verl.trainer.ppo.core_algos import agg_loss
    from verl.utils import tensordict_utils as tu
    from verl.utils.metric import AggregationType, Metric
    from verl.workers.utils.losses import ppo_loss
    from verl.workers.utils.padding import no_padding_2_padding

    term_def = spec.term
    coef = spec.resolved_coef
    prefix = spec.metric_prefix
    loss_agg_mode = config.loss_agg_mode
    bsz = int(data.batch_size[0])

    # -- which rows are replay rows ------------------------------------------------------------
    if REPLAY_MASK_KEY in data.keys():
        is_replay = _row_flags(data, bsz)
    elif spec.strict:
        raise KeyError(
            f"micro-batch has no '{REPLAY_MASK_KEY}' field: the trainer must write it on every row and the "
            "KVBatchMeta passed to the actor update must list it in `fields` (or use fields=None)"
        )
    else:
        is_replay = torch.zeros(bsz, dtype=torch.bool)
    keep_fresh = (~is_replay).tolist()
    n_replay_rows = bsz - sum(keep_fresh)

    dp_size = _non_tensor(data, "dp_size", 1)
    verl_tokens = _non_tensor(data, "batch_num_tokens", None)
    verl_seqs = _non_tensor(data, "global_batch_size", None)

    # -- normalisers ---------------------------------------------------------------------------
    counts = {k: _minibatch_count(data, k) for k in NORMALIZER_KEYS}
    if loss_agg_mode in _TOKEN_MODES:
        needed = (FRESH_TOKENS_KEY, REPLAY_TOKENS_KEY)
    elif loss_agg_mode in _SEQ_MODES:
        needed = (FRESH_SEQS_KEY, REPLAY_SEQS_KEY)
    else:  # token-sum: no normaliser
        needed = ()
    separate = spec.resolved_normalizer == "separate"
    missing = [k for k in needed if counts[k] is None]
    if separate and missing:
        if spec.strict:
            raise KeyError(
                f"normalizer='separate' with loss_agg_mode={loss_agg_mode!r} needs the per-row fields {missing} "
                "(see dyjr_verl.losses.replay_loss.minibatch_normalizer_fields); or use normalizer='joint'"
            )
        separate = False

    if separate:  # a field the agg mode does not use may be absent: keep verl's value there

        def _or(key: str, fallback: Any) -> Any:
            return counts[key] if counts[key] is not None else fallback

        fresh_tokens, replay_tokens = _or(FRESH_TOKENS_KEY, verl_tokens), _or(REPLAY_TOKENS_KEY, verl_tokens)
        fresh_seqs, replay_seqs = _or(FRESH_SEQS_KEY, verl_seqs), _or(REPLAY_SEQS_KEY, verl_seqs)
    else:
        fresh_tokens = replay_tokens = verl_tokens
        fresh_seqs = replay_seqs = verl_seqs

    # -- fresh rows: verl's own ppo_loss -------------------------------------------------------
    if n_replay_rows == 0 and not separate:
        fresh_data = data
    else:
        fresh_data = data.copy()  # shallow: tensors shared, keys replaceable
        if n_replay_rows:
            fresh_data["response_mask"] = _zero_rows(data["response_mask"], keep_fresh)
        if separate:
            tu.assign_non_tensor(fresh_data, batch_num_tokens=fresh_tokens, global_batch_size=fresh_seqs)
    fresh_loss, metrics = ppo_loss(config, model_output, fresh_data, dp_group)
    metrics = dict(metrics)

    # -- replay rows: the replay term only -----------------------------------------------------
    agg_type = _global_info_metric_type(dp_size, verl_tokens, verl_seqs, config)
    resp_mask_all = data["response_mask"]
    if getattr(resp_mask_all, "is_nested", False):
        resp_mask_all = resp_mask_all.to_padded_tensor(0)
    row_tokens = resp_mask_all.float().reshape(bsz, -1).sum(dim=-1)
    n_replay_tokens = float(row_tokens[is_replay.to(row_tokens.device)].sum()) if n_replay_rows else 0.0
    n_fresh_tokens = float(row_tokens.sum()) - n_replay_tokens

    stats = {"u": 0.0, "u_outside": 0.0, "drift": 0.0, "weight": 0.0}
    if n_replay_rows:
        if STORED_LOG_PROBS_KEY not in data.keys():
            raise KeyError(f"micro-batch has replay rows but no '{STORED_LOG_PROBS_KEY}' field")
        log_prob = no_padding_2_padding(model_output["log_probs"], data)
        width = log_prob.shape[1]
        fields = ["response_mask", STORED_LOG_PROBS_KEY]
        if term_def.needs_advantages:
            fields.append("advantages")
        padded = data.select(*fields).to_padded_tensor()
        device = log_prob.device
        rows = is_replay.to(device)
        tok_mask = _fit_width(padded["response_mask"], width).to(device).bool() & rows[:, None]
        cdtype = torch.float64 if log_prob.dtype == torch.float64 else torch.float32  # never below fp32
        stored = _fit_width(padded[STORED_LOG_PROBS_KEY], width).to(device=device, dtype=cdtype)
        advantages = _fit_width(padded["advantages"], width).to(device) if term_def.needs_advantages else None

        log_u = torch.where(tok_mask, log_prob.to(cdtype) - stored, torch.zeros_like(stored))
        log_u = log_u.clamp(-spec.log_u_clamp, spec.log_u_clamp)
        out = term_def.fn(log_u, advantages, tok_mask, spec)
        replay_term = agg_loss(
            loss_mat=out.loss_mat,
            loss_mask=tok_mask.float(),
            loss_agg_mode=loss_agg_mode,
            dp_size=dp_size,
            batch_num_tokens=replay_tokens,
            global_batch_size=replay_seqs,
            loss_scale_factor=config.loss_scale_factor,
        )
        with torch.no_grad():
            lu = log_u.detach()
            m = tok_mask.float()
            stats["u"] = float((torch.exp(lu) * m).sum())
            stats["u_outside"] = float((((lu < -math.log(2.0)) | (lu > math.log(2.0))).float() * m).sum())
            stats["drift"] = float((lu.abs() * m).sum())
            stats["weight"] = float((out.weight * m).sum())
        loss = fresh_loss + coef * replay_term.to(fresh_loss.dtype)
    else:
        replay_term = torch.zeros((), device=fresh_loss.device)
        loss = fresh_loss

    # -- metrics -------------------------------------------------------------------------------
    global_replay_tokens = counts[REPLAY_TOKENS_KEY]
    if global_replay_tokens is not None:  # exact mini-batch token means (SUM over micro-batches)
        scale = float(dp_size) / global_replay_tokens
        token_mean = {k: Metric(AggregationType.SUM, v * scale) for k, v in stats.items()}
    else:  # per-micro-batch means, averaged
        denom = max(n_replay_tokens, 1.0)
        token_mean = {k: Metric(AggregationType.MEAN, v / denom) for k, v in stats.items()}
    term_value = float(replay_term.detach())
    metrics.update(
        {
            f"{prefix}rows": Metric(AggregationType.SUM, float(n_replay_rows)),
            f"{prefix}tokens": Metric(AggregationType.SUM, n_replay_tokens),
            f"{prefix}fresh_tokens": Metric(AggregationType.SUM, n_fresh_tokens),
            f"{prefix}term": Metric(agg_type, term_value),
            f"{prefix}loss": Metric(agg_type, coef * term_value),
            f"{prefix}coef": coef,
            f"{prefix}u_mean": token_mean["u"],
            f"{prefix}u_outside": token_mean["u_outside"],
            f"{prefix}drift": token_mean["drift"],
            f"{prefix}weight_mean": token_mean["weight"],
        }
    )
    return loss, metrics


# ----------------------------------------------------------------------------------------------
# trainer-side helper for the normaliser fields
# ----------------------------------------------------------------------------------------------


def minibatch_normalizer_fields(
    is_replay: Any,
    num_tokens: Any,
    *,
    mini_batch_size: int,
    dp_size: int = 1,
    shuffle: bool = False,
) -> dict[str, torch.Tensor]:
    """The four per-row normaliser fields for a whole actor-update batch, in the row order handed
    to verl's ``update_actor``.

    Args:
        is_replay: (N,) bool/0-1, replay rows.
        num_tokens: (N,) valid response tokens per row (sum of ``response_mask``).
        mini_batch_size: rows per optimizer mini-batch over all dp ranks
            (``ppo_mini_batch_size * rollout.n``, verl's ``global_batch_size``).
        dp_size: data-parallel size of the actor.
        shuffle: ``actor.shuffle``. False: exact per-mini-batch counts for verl's layout (dp
            contiguous chunks of N/dp rows, each cut into contiguous mini-batches of
            mini_batch_size/dp rows; mini-batch k = the k-th cut of every rank). True: the
            step totals divided by the number of mini-batches, on every row.

    Returns:
        {field name: float32 (N,) tensor} for ``fresh/replay_tokens/seqs_in_minibatch``.
    """
    rep = torch.as_tensor(is_replay).reshape(-1).bool()
    tok = torch.as_tensor(num_tokens).reshape(-1).to(torch.float64)
    n = rep.numel()
    if tok.numel() != n:
        raise ValueError(f"is_replay has {n} rows but num_tokens has {tok.numel()}")
    if mini_batch_size < 1 or dp_size < 1 or mini_batch_size % dp_size:
        raise ValueError(f"mini_batch_size ({mini_batch_size}) must be a positive multiple of dp_size ({dp_size})")
    if n % dp_size or (n // dp_size) % (mini_batch_size // dp_size):
        raise ValueError(
            f"{n} rows cannot be split into dp_size={dp_size} chunks of whole mini-batches of {mini_batch_size} rows"
        )
    chunk = n // dp_size
    per_rank = mini_batch_size // dp_size
    num_mb = chunk // per_rank
    fresh = (~rep).to(torch.float64)
    repf = rep.to(torch.float64)
    if shuffle:
        mb = torch.zeros(n, dtype=torch.long)
        num_groups = 1
        div = float(num_mb)
    else:
        mb = (torch.arange(n) % chunk) // per_rank
        num_groups = num_mb
        div = 1.0

    def per_group(values: torch.Tensor) -> torch.Tensor:
        sums = torch.zeros(num_groups, dtype=torch.float64).index_add_(0, mb, values)
        return (sums / div)[mb].to(torch.float32)

    return {
        FRESH_TOKENS_KEY: per_group(tok * fresh),
        REPLAY_TOKENS_KEY: per_group(tok * repf),
        FRESH_SEQS_KEY: per_group(fresh),
        REPLAY_SEQS_KEY: per_group(repf),
    }
