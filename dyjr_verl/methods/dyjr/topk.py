"""Exact Jensen-Shannon divergence on a stored top-k support (the alternative to sampled f_JS).

The sampled-token estimator (:mod:`.divergence`) sees one token per position. With the
top-k of the *generating* distribution Q stored when a trajectory enters the buffer (ids, their
log-probs, and the rest mass), the JS divergence between the current policy P and Q is computed
exactly on the coarse-grained support ``{stored ids} U {rest}``::

    P = (p_1 .. p_k, p_rest)   from the current logits (kernel: log-probs at the ids, log rest mass)
    Q = (q_1 .. q_k, q_rest)   stored
    JSD(P, Q) = 1/2 sum_b [ p_b log(2 p_b / (p_b + q_b)) + q_b log(2 q_b / (p_b + q_b)) ]
              = 1/2 sum_b [ p_b (log 2 - softplus(log q_b - log p_b))
                          + q_b (log 2 - softplus(log p_b - log q_b)) ]        # form used here

Each bucket's term is ``(p_b + q_b)(log 2 - H_2(p_b / (p_b + q_b))) >= 0``, so JSD is in
``[0, log 2]``, 0 when P = Q, symmetric; it is a lower bound of the full-vocabulary JSD (lumping
tokens can only lose information) and equals it when Q has no mass outside its top-k or when the
rest bucket is a single token (k = V - 1). Everything is computed in fp32 log space (bf16 stored
log-probs are upcast); log-probs are clamped below at log(1e-30).

Scale: the replay term is ``2 * JSD`` (:data:`TOPK_JS_SCALE`), the quantity whose unbiased
estimate the sampled ``f_JS`` token mean is (E_Q[f_JS(P/Q)] = 2 JSD), so switching a run from the
``js`` term to ``topk_js`` keeps the meaning of lambda.

Pieces:

* the record itself and how it is built (:mod:`dyjr_verl.diagnostics.topk_record`: the old-log-prob
  probe computes it); here: :func:`take_record` (the admitted rows' records, read when they are
  stored) and :func:`record_fields` (stored records as the update's jagged fields: replayed rows
  only, empty on fresh rows);
* :func:`topk_jsd`, :func:`topk_jsd_from_hidden`, :func:`jsd_from_logprobs`: per-token JSD;
  :func:`topk_js_loss`: masked aggregation with verl's ``agg_loss`` (same modes and
  ``global_batch_info`` normalisers as every verl loss).
* verl 0.9.1 engine integration: the replay term ``topk_js`` (registered in
  :data:`dyjr_verl.replay.terms.REPLAY_TERMS`) and :func:`make_topk_js_replay_loss_fn`, a
  ``set_loss_fn`` loss that works both as the FSDP engine's logits processor (called with
  ``student_logits=`` when the micro-batch flag ``distillation_use_topk`` is True) and as the final
  loss (verl ``ppo_loss`` on fresh rows + ``coef * 2 JSD`` on replay rows, with every
  normaliser / mask / metric of :func:`dyjr_verl.replay.loss.replay_aware_loss`). The data
  contract is in ``docs/topk.md`` and :func:`topk_js_logits_processor`.
"""

from __future__ import annotations

import functools
from typing import Any, Optional

import torch
from verl.utils.tensordict_utils import nested_tensor_from_tensor_list

from dyjr_verl.diagnostics.topk_record import (
    TOPK_RECORD_PREFIX,
    TopKRecord,
    dense,
    record_from_model_output,
    response_positions,
)
from dyjr_verl.kernels.topk_logsoftmax import topk_log_softmax
from dyjr_verl.methods.dyjr.topk_jsd import (  # noqa: F401  (re-exported: one import for the top-k JS pieces)
    LOG2,
    TOPK_JS_SCALE,
    jsd_from_logprobs,
    support_logprobs,
    topk_js_loss,
    topk_jsd,
    topk_jsd_from_hidden,
)
from dyjr_verl.replay.loss import replay_aware_loss
from dyjr_verl.replay.rows import REPLAY_MASK_KEY, REPLAY_TOKENS_KEY
from dyjr_verl.replay.terms import ReplayLossSpec, ReplayTermOutput, register_replay_term

__all__ = [
    "LOG2",
    "TOPK_JS_SCALE",
    "TOPK_JS_TERM",
    "TOPK_IDS_KEY",
    "TOPK_LOGP_KEY",
    "TOPK_LOG_REST_KEY",
    "TOPK_JSD_KEY",
    "TOPK_MASS_KEY",
    "RECORD_FIELDS",
    "take_record",
    "record_fields",
    "jsd_from_logprobs",
    "topk_jsd",
    "topk_jsd_from_hidden",
    "topk_js_loss",
    "topk_js_logits_processor",
    "topk_js_replay_loss",
    "make_topk_js_replay_loss_fn",
    "TOPK_JS_SPEC",
]

TOPK_JS_TERM = "topk_js"

# per-row fields the trainer writes (response-aligned, like response_mask; see docs/topk.md)
TOPK_IDS_KEY = "dyjr_topk_ids"  # int32 (B, T_resp, k)
TOPK_LOGP_KEY = "dyjr_topk_logp"  # bf16/fp32 (B, T_resp, k)
TOPK_LOG_REST_KEY = "dyjr_topk_log_rest"  # bf16/fp32 (B, T_resp)
RECORD_FIELDS = (TOPK_IDS_KEY, TOPK_LOGP_KEY, TOPK_LOG_REST_KEY)
# model_output keys produced by the logits processor (per packed position, (1, nnz_local))
TOPK_JSD_KEY = "dyjr_topk_jsd"
TOPK_MASS_KEY = "dyjr_topk_cur_mass"


# ----------------------------------------------------------------------------------------------
# the record as the loss's fields
# ----------------------------------------------------------------------------------------------


def record_read_fields(k: int) -> list[str]:
    """TransferQueue fields of the probe's record of ``k`` ids (plus the lengths it is aligned by)."""
    per_token = [f"id{i}" for i in range(k)] + [f"logp{i}" for i in range(k)] + ["log_rest"]
    return ["prompts", "responses"] + [f"{TOPK_RECORD_PREFIX}{name}" for name in per_token]


def take_record(data: Any, k: int, *, dtype: torch.dtype = torch.bfloat16) -> list[TopKRecord]:
    """The records of ``data``'s rows (the admitted ones; response length each; ids int32, log-probs
    and rest mass in ``dtype``: ``6k + 2`` bytes/token in bf16), copied so they pin no
    TransferQueue buffer."""
    rec = record_from_model_output(data, data, k, dtype=dtype)
    lengths = data["responses"].offsets().diff().tolist() if data["responses"].is_nested else [rec.ids.shape[1]] * len(rec.ids)
    return [TopKRecord(rec.ids[i, :n].clone(), rec.logp[i, :n].clone(), rec.log_rest[i, :n].clone())
            for i, n in enumerate(lengths)]


def record_fields(records: list[Optional[TopKRecord]]) -> dict[str, torch.Tensor]:
    """Records as the jagged response-aligned fields the top-k loss reads: each row's record at its
    own length (a replayed row's response length), an empty one (0 positions) where a row has
    none (fresh rows: they never read it). ``{}`` when no row has a record."""
    given = [r for r in records if r is not None]
    if not given:
        return {}
    k, like = int(given[0].ids.shape[-1]), given[0]

    def column(name: str, tail: tuple) -> torch.Tensor:
        empty = getattr(like, name).new_zeros((0, *tail))
        parts = [empty if r is None else getattr(r, name).contiguous() for r in records]
        return nested_tensor_from_tensor_list(parts, ragged_idx=1)

    return {TOPK_IDS_KEY: column("ids", (k,)), TOPK_LOGP_KEY: column("logp", (k,)),
            TOPK_LOG_REST_KEY: column("log_rest", ())}


def _response_aligned(field: torch.Tensor, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A record field (jagged or padded, (B, T, ...)) as a dense (B, >= width, ...) tensor, and each
    row's record length (B,)."""
    if getattr(field, "is_nested", False):
        lengths = field.offsets().diff()
        if int(lengths.max()) > 0:
            out = field.to_padded_tensor(0)
        else:  # every row empty
            out = field.values().new_zeros((len(lengths), 0, *field.values().shape[1:]))
    else:
        out, lengths = field, torch.full((field.shape[0],), field.shape[1], dtype=torch.long)
    if out.shape[1] < width:  # rows without a record (fresh rows) may have longer responses
        wide = out.new_zeros((out.shape[0], width, *out.shape[2:]))
        wide[:, : out.shape[1]] = out
        out = wide
    return out, lengths


# ----------------------------------------------------------------------------------------------
# verl 0.9.1 engine integration
# ----------------------------------------------------------------------------------------------


def topk_js_logits_processor(student_logits: torch.Tensor, data, *, backend: str = "auto") -> dict[str, torch.Tensor]:
    """The FSDP engine's logits-processor call: per packed position JSD(P, Q) on replay rows'
    response tokens (0 elsewhere; nothing is computed there).

    ``student_logits``: ``(1, nnz_local, V)``, temperature-scaled by the engine, packed in the
    micro-batch's row order (prompt + response of each row, no padding), sliced per Ulysses rank
    when sequence parallel. Packed position ``t`` predicts token ``t + 1``; response token ``j`` of
    row ``b`` is therefore scored at ``end_b - resp_len_b - 1 + j`` (the same alignment verl's
    ``no_padding_2_padding`` uses for ``log_probs``).

    Reads from ``data``: ``prompts`` / ``responses`` (lengths), ``response_mask``, ``replay_mask``
    (B,), and the response-aligned record :data:`TOPK_IDS_KEY` (int, (B, T_resp, k)),
    :data:`TOPK_LOGP_KEY` ((B, T_resp, k)), :data:`TOPK_LOG_REST_KEY` ((B, T_resp)), dense padded
    or jagged. Returns ``{TOPK_JSD_KEY: (1, nnz_local) with grad, TOPK_MASS_KEY: (1, nnz_local)
    detached current mass on the stored ids}``.

    The record itself is produced by the old-log-prob probe (:mod:`dyjr_verl.diagnostics.probe`).
    """
    logits = student_logits.reshape(-1, student_logits.shape[-1])
    n_local = logits.shape[0]
    device = logits.device
    zeros = torch.zeros(n_local, device=device, dtype=torch.float32)
    bsz = int(data.batch_size[0])
    if REPLAY_MASK_KEY not in data.keys():
        return {TOPK_JSD_KEY: zeros[None], TOPK_MASS_KEY: zeros[None].clone()}
    replay = data[REPLAY_MASK_KEY].reshape(bsz).to(device).float() > 0.5
    if not bool(replay.any()):
        return {TOPK_JSD_KEY: zeros[None], TOPK_MASS_KEY: zeros[None].clone()}
    missing = [key for key in (TOPK_IDS_KEY, TOPK_LOGP_KEY, TOPK_LOG_REST_KEY) if key not in data.keys()]
    if missing:
        raise KeyError(f"micro-batch has replay rows but not the top-k record fields {missing} (see docs/topk.md)")

    rows, want, width = response_positions(data, n_local, device, row_filter=replay)
    fields = []
    for name in (TOPK_IDS_KEY, TOPK_LOGP_KEY, TOPK_LOG_REST_KEY):
        t, lengths = _response_aligned(data[name], width)
        beyond = torch.arange(width, device=device) >= lengths.to(device)[:, None]  # past the row's record
        if t.shape[0] != bsz or bool((want & beyond).any()):
            raise ValueError(f"'{name}' has shape {tuple(t.shape)}: need {bsz} rows and a record as long as "
                             "each replayed row's response")
        fields.append(t.to(device))
    ids, logq, lrest_q = fields
    if rows.numel() == 0:
        return {TOPK_JSD_KEY: zeros[None], TOPK_MASS_KEY: zeros[None].clone()}
    k = ids.shape[-1]
    sel_ids = ids[:, :width][want].long()
    sel_logq = logq[:, :width][want]
    sel_lrest = lrest_q[:, :width][want]
    full_ids = torch.zeros((n_local, k), dtype=torch.long, device=device)
    full_ids[rows] = sel_ids  # only the selected rows are ever read
    out = topk_log_softmax(logits, full_ids, rows=rows, backend=backend)
    log_p = support_logprobs(out.logp, out.log_rest)
    log_q = support_logprobs(sel_logq, sel_lrest)
    jsd = jsd_from_logprobs(log_p, log_q)
    jsd_full = zeros.index_put((rows,), jsd.to(zeros.dtype))
    with torch.no_grad():
        mass = zeros.index_put((rows,), (-torch.expm1(out.log_rest.detach())).to(zeros.dtype))
    return {TOPK_JSD_KEY: jsd_full[None], TOPK_MASS_KEY: mass[None]}


@register_replay_term(TOPK_JS_TERM, default_coef=0.1, default_normalizer="separate")
def _topk_js_replay_term(log_u, advantages, mask, spec, extra) -> ReplayTermOutput:
    """2 * JSD(P, Q) on the stored top-k support; reported weight = the token's JSD."""
    jsd = extra.get(TOPK_JSD_KEY)
    if jsd is None:
        raise RuntimeError(
            "the 'topk_js' replay term needs the per-token JSD from the logits processor: install the loss with "
            "dyjr_verl.methods.dyjr.topk.make_topk_js_replay_loss_fn (not make_replay_loss_fn) and set the micro-batch "
            "flag distillation_use_topk=True for the actor update"
        )
    if tuple(jsd.shape) != tuple(log_u.shape):
        raise ValueError(f"per-token JSD {tuple(jsd.shape)} does not match the response layout {tuple(log_u.shape)}")
    jsd = torch.where(mask, jsd.to(log_u.dtype), torch.zeros_like(log_u))
    return ReplayTermOutput(TOPK_JS_SCALE * jsd, jsd.detach())


TOPK_JS_SPEC = ReplayLossSpec(kind=TOPK_JS_TERM)


def topk_js_replay_loss(
    config: Any,
    model_output: Any = None,
    data: Any = None,
    dp_group: Any = None,
    *,
    spec: ReplayLossSpec = TOPK_JS_SPEC,
    backend: str = "auto",
    student_logits: Optional[torch.Tensor] = None,
    **kwargs: Any,
):
    """``set_loss_fn`` loss for exact top-k JS replay. Two call forms, as verl's FSDP engine makes
    them when the micro-batch flag ``distillation_use_topk`` is True:

    * ``loss(student_logits=..., data=...)`` -> :func:`topk_js_logits_processor` (per-token dict);
    * ``loss(model_output=..., data=..., dp_group=...)`` -> ``(loss, metrics)``: exactly
      :func:`replay_aware_loss` with the ``topk_js`` term (fresh rows: verl ``ppo_loss``; replay
      rows: ``coef * agg(2 JSD)`` with the separate normalisers), plus ``replay/topk_cur_mass``
      (current-policy mass on the stored ids, token mean over replay tokens of the micro-batch).
    """
    if student_logits is not None:
        return topk_js_logits_processor(student_logits, data, backend=backend)
    if spec.kind != TOPK_JS_TERM:
        raise ValueError(f"topk_js_replay_loss needs spec.kind={TOPK_JS_TERM!r}, got {spec.kind!r}")
    from verl.workers.utils.padding import no_padding_2_padding

    jsd = model_output.get(TOPK_JSD_KEY) if hasattr(model_output, "get") else None
    if jsd is None:
        bsz = int(data.batch_size[0])
        has_replay = REPLAY_MASK_KEY in data.keys() and bool((data[REPLAY_MASK_KEY].reshape(bsz).float() > 0.5).any())
        if has_replay:
            raise KeyError(
                f"model_output has no '{TOPK_JSD_KEY}': the engine did not call the logits processor. The trainer must set "
                "the non-tensor flag distillation_use_topk=True on the actor-update batch (FSDP engine, "
                "use_fused_kernels=False, pad_to_length off); see docs/topk.md"
            )
        padded = None
    else:
        padded = no_padding_2_padding(jsd, data)
    extra = {} if padded is None else {TOPK_JSD_KEY: padded}
    loss, metrics = replay_aware_loss(config, model_output, data, dp_group, spec=spec, extra=extra)
    mass = model_output.get(TOPK_MASS_KEY) if hasattr(model_output, "get") else None
    if mass is not None and padded is not None:
        metrics[f"{spec.metric_prefix}topk_cur_mass"] = _mass_metric(mass, data)
    return loss, metrics


def _mass_metric(mass, data):
    """Token mean over replay tokens of the current mass on the stored ids: exact over the
    mini-batch (SUM of local_sum * dp / count) when ``replay_tokens_in_minibatch`` is present, else
    the micro-batch mean (MEAN; 0 for micro-batches without replay tokens), as replay_loss does."""
    from verl.utils import tensordict_utils as tu
    from verl.utils.metric import AggregationType, Metric
    from verl.workers.utils.padding import no_padding_2_padding

    with torch.no_grad():
        m = no_padding_2_padding(mass, data).float()
        bsz = int(data.batch_size[0])
        rep = (data[REPLAY_MASK_KEY].reshape(bsz).float() > 0.5).to(m.device)
        keep = dense(data["response_mask"]).to(m.device).bool()[:, : m.shape[1]] & rep[:, None]
        local_sum = float((m * keep).sum())
        local_n = float(keep.sum())
    if REPLAY_TOKENS_KEY in data.keys():
        count = max(float(data[REPLAY_TOKENS_KEY].reshape(-1)[0]), 1.0) if data[REPLAY_TOKENS_KEY].numel() else 1.0
        dp_size = tu.get_non_tensor_data(data=data, key="dp_size", default=1)
        return Metric(AggregationType.SUM, local_sum * float(dp_size) / count)
    return Metric(AggregationType.MEAN, local_sum / max(local_n, 1.0))


def make_topk_js_replay_loss_fn(config: Any, spec: Optional[ReplayLossSpec] = None, *, backend: str = "auto") -> functools.partial:
    """The picklable ``partial`` for ``actor_rollout_wg.set_loss_fn`` (spec kind must be
    ``topk_js``; default coef 0.1, separate normalisers)."""
    spec = TOPK_JS_SPEC if spec is None else spec
    if spec.kind != TOPK_JS_TERM:
        raise ValueError(f"spec.kind must be {TOPK_JS_TERM!r}, got {spec.kind!r}")
    return functools.partial(topk_js_replay_loss, config=config, spec=spec, backend=backend)
