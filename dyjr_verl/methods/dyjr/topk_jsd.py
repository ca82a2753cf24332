"""Exact Jensen-Shannon divergence between the current policy and a stored top-k record, on the
coarse support ``{stored ids} U {rest}`` (the math; the engine integration is :mod:`.topk`)."""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F

from dyjr_verl.diagnostics.topk_record import LOG_PROB_FLOOR, TopKRecord
from dyjr_verl.kernels.topk_logsoftmax import topk_log_softmax, topk_log_softmax_from_hidden

__all__ = ["LOG2", "TOPK_JS_SCALE", "jsd_from_logprobs", "support_logprobs", "topk_jsd", "topk_jsd_from_hidden",
           "topk_js_loss"]

LOG2 = math.log(2.0)
#: the replay term is TOPK_JS_SCALE * JSD = KL(P||M) + KL(Q||M), the sampled f_JS's expectation.
TOPK_JS_SCALE = 2.0


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


def support_logprobs(logp: torch.Tensor, log_rest: torch.Tensor) -> torch.Tensor:
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
    log_p = support_logprobs(kernel_out.logp, kernel_out.log_rest)
    log_q = support_logprobs(logq.to(log_p.device), lrest_q.to(log_p.device))
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


def _masked_jsd(lead: tuple, record: TopKRecord, mask: Optional[torch.Tensor], device, stats) -> torch.Tensor:
    """JSD at the masked positions of ``lead``: ``stats(ids [n, k], rows)`` is the kernel call (from
    logits or from hidden states); unmasked positions are 0."""
    _check_record(record, lead)
    n, k = math.prod(lead), record.ids.shape[-1]
    rows = _mask_rows(mask, lead, device)
    return _scatter_rows(_jsd_rows(stats(record.ids.reshape(n, k), rows), record, rows, n, k), rows, lead)


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
    lead = tuple(logits.shape[:-1])
    flat = logits.reshape(math.prod(lead), logits.shape[-1])
    return _masked_jsd(lead, record, mask, logits.device, lambda ids, rows: topk_log_softmax(
        flat, ids, temperature=temperature, rows=rows, backend=backend, chunk_size=chunk_size,
        block_elems=block_elems))


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
    flat = hidden.reshape(math.prod(lead), hidden.shape[-1])
    return _masked_jsd(lead, record, mask, hidden.device, lambda ids, rows: topk_log_softmax_from_hidden(
        flat, weight, ids, temperature=temperature, rows=rows, chunk_size=chunk_size, block_elems=block_elems))


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


