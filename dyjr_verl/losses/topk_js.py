"""Exact Jensen-Shannon divergence on a stored top-k support (the alternative to sampled f_JS).

The sampled-token estimator (:mod:`dyjr_verl.losses.js`) sees one token per position. With the
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

* :func:`build_topk_record` (from logits) / :func:`record_from_topk_logprobs` (from an inference
  engine's top-k log-probs): the per-token record ``(ids int32, logp bf16, log_rest bf16)``;
  :func:`topk_record_bytes_per_token`, :func:`topk_buffer_bytes`: storage estimates.
* :func:`topk_jsd`, :func:`topk_jsd_from_hidden`, :func:`jsd_from_logprobs`: per-token JSD;
  :func:`topk_js_loss`: masked aggregation with verl's ``agg_loss`` (same modes and
  ``global_batch_info`` normalisers as every verl loss).
* verl 0.9.1 engine integration: the replay term ``topk_js`` (registered in
  :data:`dyjr_verl.losses.replay_loss.REPLAY_TERMS`) and :func:`make_topk_js_replay_loss_fn`, a
  ``set_loss_fn`` loss that works both as the FSDP engine's logits processor (called with
  ``student_logits=`` when the micro-batch flag ``distillation_use_topk`` is True) and as the final
  loss (verl ``ppo_loss`` on fresh rows + ``coef * 2 JSD`` on replay rows, with every
  normaliser / mask / metric of :func:`dyjr_verl.losses.replay_loss.replay_aware_loss`). The data
  contract is in ``docs/topk.md`` and :func:`topk_js_logits_processor`.
"""

from __future__ import annotations

import contextvars
import functools
import math
from typing import Any, NamedTuple, Optional

import torch
import torch.nn.functional as F

from dyjr_verl.kernels.topk_logsoftmax import (
    LOG_REST_FLOOR,
    topk_log_softmax,
    topk_log_softmax_from_hidden,
)
from dyjr_verl.losses.replay_loss import (
    REPLAY_MASK_KEY,
    REPLAY_TOKENS_KEY,
    ReplayLossSpec,
    ReplayTermOutput,
    register_replay_term,
    replay_aware_loss,
)

__all__ = [
    "LOG2",
    "LOG_PROB_FLOOR",
    "TOPK_JS_SCALE",
    "TOPK_JS_TERM",
    "TOPK_IDS_KEY",
    "TOPK_LOGP_KEY",
    "TOPK_LOG_REST_KEY",
    "TOPK_JSD_KEY",
    "TOPK_MASS_KEY",
    "TOPK_RECORD_FLAG",
    "TOPK_RECORD_PREFIX",
    "record_from_model_output",
    "TopKRecord",
    "build_topk_record",
    "record_from_topk_logprobs",
    "topk_record_bytes_per_token",
    "topk_buffer_bytes",
    "jsd_from_logprobs",
    "topk_jsd",
    "topk_jsd_from_hidden",
    "topk_js_loss",
    "topk_js_logits_processor",
    "response_positions",
    "topk_js_replay_loss",
    "make_topk_js_replay_loss_fn",
    "TOPK_JS_SPEC",
]

LOG2 = math.log(2.0)
#: log-probs (current and stored) are clamped below at log(1e-30) = the kernel's rest floor.
LOG_PROB_FLOOR = LOG_REST_FLOOR
#: the replay term is TOPK_JS_SCALE * JSD = KL(P||M) + KL(Q||M), the sampled f_JS's expectation.
TOPK_JS_SCALE = 2.0
TOPK_JS_TERM = "topk_js"

# per-row fields the trainer writes (response-aligned, like response_mask; see docs/topk.md)
TOPK_IDS_KEY = "dyjr_topk_ids"  # int32 (B, T_resp, k)
TOPK_LOGP_KEY = "dyjr_topk_logp"  # bf16/fp32 (B, T_resp, k)
TOPK_LOG_REST_KEY = "dyjr_topk_log_rest"  # bf16/fp32 (B, T_resp)
# model_output keys produced by the logits processor (per packed position, (1, nnz_local))
TOPK_JSD_KEY = "dyjr_topk_jsd"
TOPK_MASS_KEY = "dyjr_topk_cur_mass"
# record pass: non-tensor micro-batch flag (int k > 0) and the per-token output keys
TOPK_RECORD_FLAG = "dyjr_topk_record_k"
TOPK_RECORD_PREFIX = "dyjr_topk_rec_"


class TopKRecord(NamedTuple):
    """The stored distribution at each position: ``ids`` [..., k] (int32), ``logp`` [..., k]
    (log-probs of those ids; bf16 or fp32), ``log_rest`` [...] (log of the mass outside them)."""

    ids: torch.Tensor
    logp: torch.Tensor
    log_rest: torch.Tensor


# ----------------------------------------------------------------------------------------------
# records and storage
# ----------------------------------------------------------------------------------------------


@torch.no_grad()
def build_topk_record(
    logits: torch.Tensor,
    k: int,
    *,
    temperature: float = 1.0,
    dtype: torch.dtype = torch.bfloat16,
    backend: str = "auto",
    row_chunk: int = 4096,
) -> TopKRecord:
    """The top-k record of ``softmax(logits / temperature)`` at every position of ``logits``
    ``[..., V]``: ids of the k largest logits (int32, descending), their log-probs and the log rest
    mass (by exclusion, accurate when the top-k hold ~all the mass), both in ``dtype``. Use the
    sampling temperature: the record must describe the distribution the tokens were drawn from."""
    vocab = logits.shape[-1]
    if not (1 <= k <= vocab):
        raise ValueError(f"k must be in [1, {vocab}], got {k}")
    lead = tuple(logits.shape[:-1])
    x = logits.reshape(-1, vocab)
    ids = torch.empty((x.shape[0], k), dtype=torch.long, device=x.device)
    for r0 in range(0, x.shape[0], row_chunk):  # bounded topk workspace
        ids[r0 : r0 + row_chunk] = x[r0 : r0 + row_chunk].topk(k, dim=-1).indices
    out = topk_log_softmax(x, ids, temperature=temperature, backend=backend)
    return TopKRecord(
        ids.to(torch.int32).reshape(*lead, k),
        out.logp.to(dtype).reshape(*lead, k),
        out.log_rest.to(dtype).reshape(lead),
    )


@torch.no_grad()
def record_from_topk_logprobs(ids: torch.Tensor, logp: torch.Tensor, *, dtype: torch.dtype = torch.bfloat16) -> TopKRecord:
    """A record from an inference engine's top-k log-probs (e.g. vLLM ``logprobs=k`` with
    ``logprobs_mode='processed_logprobs'``, i.e. after temperature). The rest mass is
    ``1 - sum exp(logp)`` in fp64: its absolute error is that of the engine's log-probs (~1e-7 for
    fp32), so rest masses below that are only approximately right (and clamped at 1e-30)."""
    lp = logp.to(torch.float64)
    mass = torch.exp(lp).sum(dim=-1)
    log_rest = torch.log1p(-mass.clamp(max=1.0)).clamp(min=LOG_PROB_FLOOR)
    return TopKRecord(ids.to(torch.int32), logp.to(dtype), log_rest.to(dtype))


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def topk_record_bytes_per_token(
    k: int,
    *,
    logp_dtype: torch.dtype = torch.bfloat16,
    id_dtype: torch.dtype = torch.int32,
    rest_dtype: Optional[torch.dtype] = None,
) -> int:
    """Bytes per stored token of a top-k record: k ids + k log-probs + 1 log rest mass
    (default int32 / bf16 / bf16: 6k + 2 bytes)."""
    if k < 0:
        raise ValueError(f"k must be >= 0, got {k}")
    rest = _itemsize(rest_dtype if rest_dtype is not None else logp_dtype)
    return k * (_itemsize(id_dtype) + _itemsize(logp_dtype)) + rest


def topk_buffer_bytes(k: int, num_tokens: int, **dtypes: Any) -> int:
    """Bytes for ``num_tokens`` stored tokens (see :func:`topk_record_bytes_per_token`)."""
    return int(num_tokens) * topk_record_bytes_per_token(k, **dtypes)


# ----------------------------------------------------------------------------------------------
# JSD
# ----------------------------------------------------------------------------------------------


def _cd(x: torch.Tensor) -> torch.Tensor:
    return x if x.dtype == torch.float64 else x.float()


def jsd_from_logprobs(log_p: torch.Tensor, log_q: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """JSD between two distributions on the same (coarse) support, given as log-probs along
    ``dim`` (fp32 at least; clamped below at :data:`LOG_PROB_FLOOR`). Symmetric, 0 for equal
    inputs, in [0, log 2] for normalised inputs, finite for any finite-or-(-inf) input."""
    a = _cd(log_p)
    b = _cd(log_q).to(a.dtype)
    a = a.clamp(min=LOG_PROB_FLOOR)
    b = b.clamp(min=LOG_PROB_FLOOR)
    t = torch.exp(a) * (LOG2 - F.softplus(b - a)) + torch.exp(b) * (LOG2 - F.softplus(a - b))
    return 0.5 * t.sum(dim=dim)


def _support_logprobs(logp: torch.Tensor, log_rest: torch.Tensor) -> torch.Tensor:
    return torch.cat([_cd(logp), _cd(log_rest).to(_cd(logp).dtype).unsqueeze(-1)], dim=-1)


def _check_record(record: TopKRecord, lead: tuple) -> None:
    if tuple(record.ids.shape[:-1]) != lead or tuple(record.logp.shape) != tuple(record.ids.shape):
        raise ValueError(
            f"record ids {tuple(record.ids.shape)} / logp {tuple(record.logp.shape)} must be [{', '.join(map(str, lead))}, k]"
        )
    if tuple(record.log_rest.shape) != lead:
        raise ValueError(f"record log_rest {tuple(record.log_rest.shape)} must be {lead}")


def _jsd_rows(kernel_out, record: TopKRecord, rows: Optional[torch.Tensor], n: int, k: int):
    logq = record.logp.reshape(n, k)
    lrest_q = record.log_rest.reshape(n)
    if rows is not None:
        logq, lrest_q = logq.index_select(0, rows), lrest_q.index_select(0, rows)
    log_p = _support_logprobs(kernel_out.logp, kernel_out.log_rest)
    log_q = _support_logprobs(logq.to(log_p.device), lrest_q.to(log_p.device))
    return jsd_from_logprobs(log_p, log_q)


def _scatter_rows(vals: torch.Tensor, rows: Optional[torch.Tensor], lead: tuple) -> torch.Tensor:
    if rows is None:
        return vals.reshape(lead)
    full = vals.new_zeros(math.prod(lead))
    return full.index_put((rows,), vals).reshape(lead)


def _mask_rows(mask: Optional[torch.Tensor], lead: tuple, device) -> Optional[torch.Tensor]:
    if mask is None:
        return None
    if tuple(mask.shape) != lead:
        raise ValueError(f"mask {tuple(mask.shape)} must have shape {lead}")
    return torch.nonzero(mask.reshape(-1).to(device).bool(), as_tuple=False).reshape(-1)


def topk_jsd(
    logits: torch.Tensor,
    record: TopKRecord,
    mask: Optional[torch.Tensor] = None,
    *,
    temperature: float = 1.0,
    backend: str = "auto",
    chunk_size: Optional[int] = None,
    block_elems: Optional[int] = None,
) -> torch.Tensor:
    """Per-position JSD(P, Q) ``[...]`` between ``softmax(logits / temperature)`` (``[..., V]``) and
    the stored record, on the support ``{record ids} U {rest}``. Only positions with ``mask`` True
    are computed (the kernel never reads the others: NaN logits there are harmless); they are 0
    and get no gradient."""
    vocab = logits.shape[-1]
    lead = tuple(logits.shape[:-1])
    _check_record(record, lead)
    n, k = math.prod(lead), record.ids.shape[-1]
    rows = _mask_rows(mask, lead, logits.device)
    out = topk_log_softmax(
        logits.reshape(n, vocab),
        record.ids.reshape(n, k),
        temperature=temperature,
        rows=rows,
        backend=backend,
        chunk_size=chunk_size,
        block_elems=block_elems,
    )
    return _scatter_rows(_jsd_rows(out, record, rows, n, k), rows, lead)


def topk_jsd_from_hidden(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    record: TopKRecord,
    mask: Optional[torch.Tensor] = None,
    *,
    temperature: float = 1.0,
    chunk_size: Optional[int] = None,
    block_elems: Optional[int] = None,
) -> torch.Tensor:
    """:func:`topk_jsd` with ``logits = hidden @ weight.T`` formed chunk by chunk (no logits)."""
    lead = tuple(hidden.shape[:-1])
    _check_record(record, lead)
    n, k = math.prod(lead), record.ids.shape[-1]
    rows = _mask_rows(mask, lead, hidden.device)
    out = topk_log_softmax_from_hidden(
        hidden.reshape(n, hidden.shape[-1]),
        weight,
        record.ids.reshape(n, k),
        temperature=temperature,
        rows=rows,
        chunk_size=chunk_size,
        block_elems=block_elems,
    )
    return _scatter_rows(_jsd_rows(out, record, rows, n, k), rows, lead)


def topk_js_loss(
    logits: torch.Tensor,
    record: TopKRecord,
    mask: torch.Tensor,
    *,
    loss_agg_mode: str = "token-mean",
    scale: float = TOPK_JS_SCALE,
    temperature: float = 1.0,
    backend: str = "auto",
    dp_size: int = 1,
    batch_num_tokens: Optional[float] = None,
    global_batch_size: Optional[float] = None,
    loss_scale_factor: Optional[float] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Standalone loss: ``agg_loss(scale * JSD, mask, loss_agg_mode, ...)`` for ``logits``
    ``[B, T, V]`` and ``mask`` ``[B, T]`` (bool or 0/1), with verl's ``agg_loss`` and its
    normaliser arguments (pass ``**config.global_batch_info`` inside a verl loss so the gradient
    does not depend on the micro-batch split). Returns ``(loss, per-token term [B, T])``."""
    from verl.trainer.ppo.core_algos import agg_loss

    if logits.dim() != 3 or tuple(mask.shape) != tuple(logits.shape[:2]):
        raise ValueError(f"need logits [B, T, V] and mask [B, T], got {tuple(logits.shape)} and {tuple(mask.shape)}")
    keep = mask.bool()
    term = scale * topk_jsd(logits, record, keep, temperature=temperature, backend=backend)
    loss = agg_loss(
        loss_mat=term,
        loss_mask=keep.to(term.dtype),
        loss_agg_mode=loss_agg_mode,
        dp_size=dp_size,
        batch_num_tokens=batch_num_tokens,
        global_batch_size=global_batch_size,
        loss_scale_factor=loss_scale_factor,
    )
    return loss, term


# ----------------------------------------------------------------------------------------------
# verl 0.9.1 engine integration
# ----------------------------------------------------------------------------------------------


def _dense(x: torch.Tensor) -> torch.Tensor:
    """(B, T, ...) dense from a jagged nested or a padded tensor."""
    return x.to_padded_tensor(0) if getattr(x, "is_nested", False) else x


def _sp_world_rank() -> tuple[int, int]:
    try:
        from verl.utils.ulysses import get_ulysses_sequence_parallel_rank, get_ulysses_sequence_parallel_world_size

        return int(get_ulysses_sequence_parallel_world_size()), int(get_ulysses_sequence_parallel_rank())
    except Exception:  # no process group (unit tests, single process)
        return 1, 0


def _prompt_response_lengths(data) -> tuple[torch.Tensor, torch.Tensor]:
    prompts, responses = data["prompts"], data["responses"]
    if getattr(prompts, "is_nested", False):
        return prompts.offsets().diff(), responses.offsets().diff()
    am = data["attention_mask"]
    p = prompts.shape[1]
    return am[:, :p].sum(dim=1), am[:, p:].sum(dim=1)


def _non_tensor(data, key: str, default: Any) -> Any:
    try:
        from verl.utils import tensordict_utils as tu

        return tu.get_non_tensor_data(data=data, key=key, default=default)
    except Exception:
        return default


def response_positions(
    data, n_local: int, device: torch.device, *, row_filter: Optional[torch.Tensor] = None
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Where the response tokens of a micro-batch sit in the engine's packed logits.

    Packed position ``t`` predicts token ``t + 1``; response token ``j`` of row ``b`` is therefore
    scored at ``end_b - resp_len_b - 1 + j`` (verl's ``no_padding_2_padding`` rule). Returns
    ``(rows, want, width)``: ``rows`` [M] local packed positions (this Ulysses rank's slice of
    ``n_local`` positions) of the selected tokens in row-major (row, token) order, ``want``
    [B, width] bool (response token j of row b is selected and local), ``width`` = longest response.
    Selected: inside the response length, ``response_mask`` set, and ``row_filter`` [B] when given.
    """
    bsz = int(data.batch_size[0])
    p_len, r_len = (t.to(device).long() for t in _prompt_response_lengths(data))
    seq_end = (p_len + r_len).cumsum(0)
    width = int(r_len.max()) if r_len.numel() else 0
    resp_mask = _dense(data["response_mask"]).to(device).bool()
    if resp_mask.shape[0] != bsz or resp_mask.shape[1] < width:
        raise ValueError(f"'response_mask' has shape {tuple(resp_mask.shape)}: need {bsz} rows and >= {width} positions")
    j = torch.arange(width, device=device)
    want = (j[None, :] < r_len[:, None]) & resp_mask[:, :width]
    if row_filter is not None:
        want = want & row_filter.to(device).bool()[:, None]
    pos = (seq_end - r_len - 1)[:, None] + j[None, :]  # packed (global) position of each response token
    _, rank = _sp_world_rank()
    lo = rank * n_local
    want = want & (pos >= lo) & (pos < lo + n_local)
    return (pos[want] - lo).long(), want, width


def record_from_model_output(model_output, data, k: int, *, dtype: torch.dtype = torch.bfloat16) -> TopKRecord:
    """Driver side of the record pass: the response-aligned record ``(B, T_resp, k)`` from the
    per-token outputs of a forward pass run with the non-tensor flag ``TOPK_RECORD_FLAG = k`` (and
    ``distillation_use_topk=True``, ``compute_loss=True``). ``model_output`` maps the
    ``TOPK_RECORD_PREFIX*`` keys to full-sequence jagged tensors (as the engine returns them);
    ``data`` carries ``prompts`` / ``responses`` (and ``attention_mask`` when not jagged)."""
    from verl.workers.utils.padding import no_padding_2_padding

    def get(name: str) -> torch.Tensor:
        key = f"{TOPK_RECORD_PREFIX}{name}"
        if key not in model_output.keys():
            raise KeyError(f"model output has no '{key}': was the forward run with {TOPK_RECORD_FLAG}={k}?")
        return no_padding_2_padding(model_output[key], data)

    ids = torch.stack([get(f"id{i}") for i in range(k)], dim=-1).to(torch.int32)
    logp = torch.stack([get(f"logp{i}") for i in range(k)], dim=-1).to(dtype)
    return TopKRecord(ids, logp, get("log_rest").to(dtype))


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

    The record itself is produced by the old-log-prob probe (:mod:`dyjr_verl.losses.probe`).
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

    ids = _dense(data[TOPK_IDS_KEY]).to(device)
    logq = _dense(data[TOPK_LOGP_KEY]).to(device)
    lrest_q = _dense(data[TOPK_LOG_REST_KEY]).to(device)
    rows, want, width = response_positions(data, n_local, device, row_filter=replay)
    for name, t in ((TOPK_IDS_KEY, ids), (TOPK_LOGP_KEY, logq), (TOPK_LOG_REST_KEY, lrest_q)):
        if t.shape[0] != bsz or t.shape[1] < width:
            raise ValueError(f"'{name}' has shape {tuple(t.shape)}: need {bsz} rows and >= {width} response positions")
    if rows.numel() == 0:
        return {TOPK_JSD_KEY: zeros[None], TOPK_MASS_KEY: zeros[None].clone()}
    k = ids.shape[-1]
    sel_ids = ids[:, :width][want].long()
    sel_logq = logq[:, :width][want]
    sel_lrest = lrest_q[:, :width][want]
    full_ids = torch.zeros((n_local, k), dtype=torch.long, device=device)
    full_ids[rows] = sel_ids  # only the selected rows are ever read
    out = topk_log_softmax(logits, full_ids, rows=rows, backend=backend)
    log_p = _support_logprobs(out.logp, out.log_rest)
    log_q = _support_logprobs(sel_logq, sel_lrest)
    jsd = jsd_from_logprobs(log_p, log_q)
    jsd_full = zeros.index_put((rows,), jsd.to(zeros.dtype))
    with torch.no_grad():
        mass = zeros.index_put((rows,), (-torch.expm1(out.log_rest.detach())).to(zeros.dtype))
    return {TOPK_JSD_KEY: jsd_full[None], TOPK_MASS_KEY: mass[None]}


# The replay term reads the per-token JSD that topk_js_replay_loss extracted for this call.
_CURRENT_JSD: contextvars.ContextVar[Optional[torch.Tensor]] = contextvars.ContextVar("dyjr_topk_jsd", default=None)


@register_replay_term(TOPK_JS_TERM, default_coef=0.1, default_normalizer="separate")
def _topk_js_replay_term(log_u, advantages, mask, spec) -> ReplayTermOutput:
    """2 * JSD(P, Q) on the stored top-k support; reported weight = the token's JSD."""
    jsd = _CURRENT_JSD.get()
    if jsd is None:
        raise RuntimeError(
            "the 'topk_js' replay term needs the per-token JSD from the logits processor: install the loss with "
            "dyjr_verl.losses.topk_js.make_topk_js_replay_loss_fn (not make_replay_loss_fn) and set the micro-batch "
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
    token = _CURRENT_JSD.set(padded)
    try:
        loss, metrics = replay_aware_loss(config, model_output, data, dp_group, spec=spec)
    finally:
        _CURRENT_JSD.reset(token)
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
        keep = _dense(data["response_mask"]).to(m.device).bool()[:, : m.shape[1]] & rep[:, None]
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
