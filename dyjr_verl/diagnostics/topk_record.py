"""The top-k record of the old-log-prob forward: at every response position, the ids of the k most
likely tokens of the sampling-time distribution, their log-probs and the log of the rest mass.

The probe (:mod:`.probe`) computes it in verl's old-log-prob pass when the non-tensor flag
:data:`TOPK_RECORD_FLAG` = k is set, as per-token outputs named :data:`TOPK_RECORD_PREFIX` ``id{i}`` /
``logp{i}`` / ``log_rest``; :func:`record_from_model_output` turns those back into a
response-aligned :class:`TopKRecord`. A method that stores the record (DyJR's exact top-k JS,
:mod:`dyjr_verl.methods.dyjr.topk`) asks the probe for it through its trainer's ``topk_record_k``.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Optional

import torch

from dyjr_verl.kernels.topk_logsoftmax import LOG_REST_FLOOR, topk_log_softmax

__all__ = [
    "LOG_PROB_FLOOR",
    "RECORD_LOGP_DTYPE",
    "TOPK_RECORD_FLAG",
    "TOPK_RECORD_PREFIX",
    "TopKRecord",
    "build_topk_record",
    "record_from_topk_logprobs",
    "record_from_model_output",
    "topk_record_bytes_per_token",
    "topk_buffer_bytes",
    "response_positions",
    "non_tensor",
    "dense",
]

#: log-probs (current and stored) are clamped below at log(1e-30) = the kernel's rest floor.
LOG_PROB_FLOOR = LOG_REST_FLOOR
#: record pass: non-tensor micro-batch flag (int k > 0) and the per-token output keys
TOPK_RECORD_FLAG = "dyjr_topk_record_k"
TOPK_RECORD_PREFIX = "dyjr_topk_rec_"
#: dtype of a record's log-probs and log rest mass as the probe emits and the buffer stores them
RECORD_LOGP_DTYPE = torch.bfloat16


class TopKRecord(NamedTuple):
    """The stored distribution at each position: ``ids`` [..., k] (int32), ``logp`` [..., k]
    (log-probs of those ids; bf16 or fp32), ``log_rest`` [...] (log of the mass outside them)."""

    ids: torch.Tensor
    logp: torch.Tensor
    log_rest: torch.Tensor


#: elements of the logits one ``topk`` call reads at a time when ``rows`` are selected (the
#: selected rows are gathered block by block: 2^22 elements = 8 MiB of bf16, ~27 rows at V = 152k)
TOPK_GATHER_ELEMS = 1 << 22


@torch.no_grad()
def build_topk_record(
    logits: torch.Tensor,
    k: int,
    *,
    temperature: float = 1.0,
    dtype: torch.dtype = torch.bfloat16,
    rows: Optional[torch.Tensor] = None,
    backend: str = "auto",
    row_chunk: int = 4096,
) -> TopKRecord:
    """The top-k record of ``softmax(logits / temperature)`` at every position of ``logits``
    ``[..., V]`` (or, with ``rows``, 1-D indices into the flattened leading dims, at those positions
    only: the record is then ``[M, k]``, and no ``[M, V]`` copy of the selected rows is made): ids
    of the k largest logits (int32, descending), their log-probs and the log rest mass (by
    exclusion, accurate when the top-k hold ~all the mass), both in ``dtype``. Use the sampling
    temperature: the record must describe the distribution the tokens were drawn from."""
    vocab = logits.shape[-1]
    if not (1 <= k <= vocab):
        raise ValueError(f"k must be in [1, {vocab}], got {k}")
    x = logits.reshape(-1, vocab)
    if rows is None:
        lead, n, chunk = tuple(logits.shape[:-1]), x.shape[0], row_chunk
    else:
        rows = torch.as_tensor(rows, device=x.device).reshape(-1).long()
        lead, n = (rows.numel(),), rows.numel()
        chunk = max(1, min(row_chunk, TOPK_GATHER_ELEMS // vocab))  # gathered blocks stay small
    ids = torch.empty((n, k), dtype=torch.long, device=x.device)
    for r0 in range(0, n, chunk):  # bounded topk workspace
        block = x[r0 : r0 + chunk] if rows is None else x.index_select(0, rows[r0 : r0 + chunk])
        ids[r0 : r0 + chunk] = block.topk(k, dim=-1).indices
    if rows is None:
        out = topk_log_softmax(x, ids, temperature=temperature, backend=backend)
    else:  # the kernel reads only the selected rows (its ids argument spans every row)
        every = torch.zeros((x.shape[0], k), dtype=torch.long, device=x.device)
        every[rows] = ids
        out = topk_log_softmax(x, every, temperature=temperature, rows=rows, backend=backend)
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


def dense(x: torch.Tensor) -> torch.Tensor:
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


def non_tensor(data, key: str, default: Any) -> Any:
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
    resp_mask = dense(data["response_mask"]).to(device).bool()
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
