"""Replay-aware engine loss for verl 0.9.1 (installed with ``actor_rollout_wg.set_loss_fn``).

One framework for every replay method whose buffer rows get a *different* loss from fresh rows:

* fresh rows (``replay_mask == 0``) get exactly verl's ``ppo_loss`` (any ``loss_mode``; entropy
  bonus and KL loss keep working): ``ppo_loss`` runs on a shallow copy of the micro-batch whose
  ``response_mask`` is zeroed on replay rows;
* replay rows (``replay_mask == 1``) get only ``coef * agg_loss(term, replay_token_mask, ...)``,
  ``u = exp(log pi_theta - stored)``, where ``term`` comes from the registry of
  :mod:`dyjr_verl.replay.terms` (each method registers its own: DyJR's ``js`` / ``forward_kl`` /
  ``topk_js``, Ex-GRPO's ``shaped_pg``).

Masks are per row (never per micro-batch), so verl's batch balancing / shuffling / dynamic
micro-batching may mix row types freely. All arithmetic is fp32 (log-probs often arrive in bf16).

Install (driver side, e.g. in a trainer's ``on_init_end``)::

    actor_cfg = omega_conf_to_dataclass(config.actor_rollout_ref.actor)
    actor_rollout_wg.set_loss_fn(make_replay_loss_fn(actor_cfg, ReplayLossSpec(kind="js")))

Data contract: the fields of :mod:`dyjr_verl.replay.rows` on EVERY row, plus finite
``old_log_probs`` / ``advantages`` of the right length on replay rows (``ppo_loss`` reads them on
every row, masked out on replay rows; a term with ``needs_advantages`` uses the advantages).

Normalisers (``normalizer='separate'``, DyJR's default). verl's scalar ``batch_num_tokens`` counts
*all* response tokens of the optimizer mini-batch across dp ranks, and ``global_batch_size`` all
its rows; with replay rows mixed in they would dilute the fresh PG loss and vice versa. So the
trainer writes, on each row, the counts of the optimizer mini-batch that row is trained in, summed
over all dp ranks:

* ``fresh_tokens_in_minibatch``: sum of ``loss_mask`` over fresh rows, what verl's engine counts
  for ``batch_num_tokens`` (with rollout rejection sampling, rejected tokens leave ``response_mask``
  but stay in ``loss_mask``); ``replay_tokens_in_minibatch``: sum of ``response_mask`` over replay
  rows, the tokens of the replay term (both used by ``token-mean``);
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
A count of 0 is treated as 1 (its numerator is 0 too). The fields are float64 (exact counts).
``normalizer='joint'`` (Ex-GRPO's single normaliser) uses verl's scalars for both parts and needs no
extra fields.

PG diagnostics. ``ppo_loss`` reports its policy-loss metrics (``actor/ppo_kl``, ``actor/pg_clipfrac``,
``actor/pg_clipfrac_lower``, bypass mode's ``rollout_corr/...``) as per-micro-batch token means that
verl averages over micro-batches, so a micro-batch of replay rows only would add a 0. With
``fresh_response_tokens_in_minibatch`` present (sum of ``response_mask`` over fresh rows) each
micro-batch's value is weighted by its share of the mini-batch's fresh tokens and aggregated with
SUM: the logged token means are those of ``ppo_loss`` on the mini-batch's fresh rows alone (exactly,
for every micro-batch split and dp size; statistics that are not token means over ``response_mask``,
such as bypass mode's maxima, become fresh-token-weighted means of the micro-batch values; bypass
mode's per-sequence statistics, e.g. ``rollout_corr/training_ppl``, still count a mixed
micro-batch's replay rows as empty sequences), and a
micro-batch without fresh tokens adds nothing (it runs ``ppo_loss`` on its replay rows' masks,
since verl's bypass-mode loss refuses an all-zero mask, and keeps neither loss nor metrics).

Metrics (keys prefixed ``replay/``; verl adds its ``actor/`` prefix when logging): ``rows``,
``tokens``, ``fresh_tokens`` (counts summed over micro-batches; verl then averages SUM metrics over
dp ranks and over the step's mini-batches, so the logged value is per rank and mini-batch, not the
step's total, which the trainer logs as ``<method>/replay/rows``), ``loss`` (coef x term)
and ``term`` (the aggregated replay term), ``coef``, and token means over replay tokens: ``u_mean``,
``u_outside`` (share of u outside [0.5, 2]), ``u_above_10`` (share of u > 10: where a weight cap
binds), ``drift`` (mean |log u|, what an adaptive store
reads back), ``log_u_mean`` (mean log u: minus the sampled KL from the stored policy to pi_theta; with
``u_mean`` it gives the forward-KL term's uncapped value, u_mean - 1 - log_u_mean), ``weight_mean``
(the term's per-token diagnostic). The token
means are exact mini-batch means when ``replay_tokens_in_minibatch`` is present (each micro-batch reports
``local_sum * dp_size / count`` with SUM aggregation); otherwise they are averages of
per-micro-batch means (micro-batches without replay tokens report 0). ``u_max``: the largest u
over the replay tokens (MAX over micro-batches and ranks; 0 without replay tokens).
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Optional

import torch
from tensordict import TensorDict

from dyjr_verl.replay.rows import (
    FRESH_RESPONSE_TOKENS_KEY,
    FRESH_SEQS_KEY,
    FRESH_TOKENS_KEY,
    NORMALIZER_KEYS,
    REPLAY_MASK_KEY,
    REPLAY_SEQS_KEY,
    REPLAY_TOKENS_KEY,
    STORED_LOG_PROBS_KEY,
)
from dyjr_verl.replay.terms import ReplayLossSpec

__all__ = ["replay_aware_loss", "row_flags", "minibatch_count", "fresh_token_weighted", "dense"]

_TOKEN_MODES = ("token-mean",)
_SEQ_MODES = ("seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm")


# ----------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------


def _non_tensor(data: TensorDict, key: str, default: Any) -> Any:
    from verl.utils import tensordict_utils as tu

    return tu.get_non_tensor_data(data=data, key=key, default=default)


def row_flags(data: TensorDict, bsz: int) -> torch.Tensor:
    rm = data[REPLAY_MASK_KEY]
    if getattr(rm, "is_nested", False):
        raise ValueError(f"'{REPLAY_MASK_KEY}' must be a dense float32 (B,) tensor, got a nested tensor")
    rm = rm.reshape(bsz, -1)
    if rm.shape[1] != 1:
        raise ValueError(f"'{REPLAY_MASK_KEY}' must have shape (B,), got {tuple(data[REPLAY_MASK_KEY].shape)}")
    return rm[:, 0].float() > 0.5


def minibatch_count(data: TensorDict, key: str) -> Optional[float]:
    """The (constant over the mini-batch) per-row count field, or None when absent."""
    if key not in data.keys():
        return None
    v = data[key]
    if getattr(v, "is_nested", False):
        raise ValueError(f"'{key}' must be a dense float64 (B,) tensor, got a nested tensor")
    v = v.detach().to("cpu", torch.float64).reshape(-1)  # exact counts; B values, read on the host
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


def dense(x: torch.Tensor) -> torch.Tensor:
    """(B, T, ...) dense from a jagged nested or a padded tensor."""
    return x.to_padded_tensor(0) if getattr(x, "is_nested", False) else x


def _fit_width(x: torch.Tensor, width: int) -> torch.Tensor:
    """Right-pad with zeros / truncate a (B, T') tensor to (B, width)."""
    t = x.shape[1]
    if t == width:
        return x
    if t > width:
        return x[:, :width]
    return torch.nn.functional.pad(x, (0, width - t))


def fresh_token_weighted(metrics: Mapping[str, Any], local_tokens: float, global_tokens: Optional[float],
                         dp_size: int) -> dict[str, Any]:
    """``ppo_loss``'s metrics for verl's aggregation: the MEAN-aggregated (per-micro-batch) ones
    re-emitted with SUM aggregation, weighted by this micro-batch's share of the mini-batch's fresh
    tokens (``dp_size`` cancels verl's mean over dp ranks), so that verl's aggregate is the
    fresh-token mean (unweighted without the global count); every metric 0 without a fresh token.
    The keys stay the same in every micro-batch (verl aggregates them per position across ranks)."""
    from verl.utils.metric import AggregationType, Metric

    out: dict[str, Any] = {}
    for key, metric in metrics.items():
        if isinstance(metric, Metric):
            weigh = global_tokens is not None and metric.aggregation == AggregationType.MEAN
            scale = local_tokens * dp_size / global_tokens if weigh else 1.0
            kept = Metric(AggregationType.SUM if weigh else metric.aggregation)
            for value in metric.values:
                kept.append(float(value) * scale if local_tokens > 0 else 0.0)
            metric = kept
        out[key] = metric
    return out


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
    spec: ReplayLossSpec,
    extra: Optional[Mapping[str, Any]] = None,
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
        extra: passed to the replay term (what a term needs beyond log u).

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
        is_replay = row_flags(data, bsz)
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
    counts = {k: minibatch_count(data, k) for k in NORMALIZER_KEYS}
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
                "(see dyjr_verl.replay.rows.minibatch_normalizer_fields); or use normalizer='joint'"
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
    resp_mask_all = data["response_mask"]
    if getattr(resp_mask_all, "is_nested", False):
        resp_mask_all = resp_mask_all.to_padded_tensor(0)
    row_tokens = resp_mask_all.float().reshape(bsz, -1).sum(dim=-1)
    n_replay_tokens = float(row_tokens[is_replay.to(row_tokens.device)].sum()) if n_replay_rows else 0.0
    n_fresh_tokens = float(row_tokens.sum()) - n_replay_tokens
    # without a fresh token, ppo_loss runs on the replay rows' masks (verl's bypass-mode loss refuses
    # an all-zero mask) and none of it is kept: loss x 0, metrics 0 (fresh_token_weighted)
    no_fresh = n_replay_rows > 0 and n_fresh_tokens == 0
    if n_replay_rows == 0 and not separate:
        fresh_data = data
    else:
        fresh_data = data.copy()  # shallow: tensors shared, keys replaceable
        if n_replay_rows and not no_fresh:
            fresh_data["response_mask"] = _zero_rows(data["response_mask"], keep_fresh)
        if separate:
            tu.assign_non_tensor(fresh_data, batch_num_tokens=fresh_tokens, global_batch_size=fresh_seqs)
    fresh_loss, verl_metrics = ppo_loss(config, model_output, fresh_data, dp_group)
    if no_fresh:
        fresh_loss = fresh_loss * 0.0
    metrics = fresh_token_weighted(verl_metrics, n_fresh_tokens, counts[FRESH_RESPONSE_TOKENS_KEY], dp_size)

    # -- replay rows: the replay term only -----------------------------------------------------
    agg_type = _global_info_metric_type(dp_size, verl_tokens, verl_seqs, config)

    stats = {"u": 0.0, "u_outside": 0.0, "u_above_10": 0.0, "drift": 0.0, "log_u": 0.0, "weight": 0.0}
    u_max = 0.0
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
        out = term_def.fn(log_u, advantages, tok_mask, spec, extra or {})
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
            stats["u_above_10"] = float(((lu > math.log(10.0)).float() * m).sum())
            u_max = float(torch.exp(lu.masked_fill(~tok_mask, -math.inf).max()))
            stats["drift"] = float((lu.abs() * m).sum())
            stats["log_u"] = float((lu * m).sum())
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
            f"{prefix}u_above_10": token_mean["u_above_10"],
            f"{prefix}u_max": Metric(AggregationType.MAX, u_max),
            f"{prefix}drift": token_mean["drift"],
            f"{prefix}log_u_mean": token_mean["log_u"],
            f"{prefix}weight_mean": token_mean["weight"],
        }
    )
    return loss, metrics
