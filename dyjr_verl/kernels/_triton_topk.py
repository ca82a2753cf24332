"""Triton backend of :func:`dyjr_verl.kernels.topk_log_softmax` (logits input).

UNVERIFIED ON GPU: these kernels have been run only in Triton's CPU interpreter
(``TRITON_INTERPRET=1``; tests/test_topk_kernel.py compares them with the torch backend there). The
interpreter checks the arithmetic, masking and indexing, not compilation, register pressure or
speed. ``python benchmarks/bench_topk_kernel.py --device cuda --check`` is the first-GPU-run check.

One program per output row streams the vocabulary in ``BLOCK_V`` columns:

* forward keeps four fp32 scalars per row (running max ``m``, ``S = sum e``, ``E = sum e (s - m)``
  for the entropy, ``R = sum e [col not in ids]`` for the rest mass), rescaled by
  ``exp(m_old - m_new)`` when the max grows; the rest mass is accumulated by exclusion, so it is
  accurate even when the ids hold almost all the mass. The membership test compares a block's
  columns only with the ids that fall in that block (ids sorted per row, per-block index ranges
  from ``searchsorted``: about k / n_blocks compares per column, not k). Optional: per-block top ``TOP_R``
  candidates (``tl.topk``), merged by torch afterwards.
* backward recomputes ``p = exp(s - lse)`` per block and stores
  ``dz = (p * (A + B [col not in ids] - gH s) + sum_{i: ids_i = col} g_logp_i) / T``
  in the logits' dtype (A, B, gH per row: see :mod:`dyjr_verl.kernels.topk_logsoftmax`).

All row offsets are computed in int64 (N x V exceeds 2^31 at 32k tokens x 152k vocab).
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from dyjr_verl.kernels.topk_logsoftmax import LOG_REST_FLOOR, _empty

__all__ = ["triton_forward", "triton_backward"]


@triton.jit
def _topk_lse_fwd_kernel(
    x_ptr,
    stride_x,
    rows_ptr,
    ids_ptr,
    stride_ids,
    sids_ptr,
    bnd_ptr,
    stride_bnd,
    lse_ptr,
    logp_ptr,
    stride_logp,
    lrest_ptr,
    ent_ptr,
    cand_ptr,
    V,
    NB,
    inv_t,
    log_rest_floor,
    K: tl.constexpr,
    BLOCK_V: tl.constexpr,
    HAS_ROWS: tl.constexpr,
    ENTROPY: tl.constexpr,
    TOP_R: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    if HAS_ROWS:
        row = tl.load(rows_ptr + pid).to(tl.int64)
    else:
        row = pid
    x_row = x_ptr + row * stride_x
    id_row = ids_ptr + pid * stride_ids
    sid_row = sids_ptr + pid * stride_ids
    bnd_row = bnd_ptr + pid * stride_bnd
    offs = tl.arange(0, BLOCK_V)

    m = -1.0e30
    S = 0.0
    E = 0.0
    R = 0.0
    for start in range(0, V, BLOCK_V):
        cols = start + offs
        inb = cols < V
        s = tl.load(x_row + cols, mask=inb, other=float("-inf")).to(tl.float32) * inv_t
        if TOP_R > 0:
            cand = tl.topk(s, TOP_R)
            blk = start // BLOCK_V
            tl.store(cand_ptr + (pid * NB + blk) * TOP_R + tl.arange(0, TOP_R), cand)
        m_new = tl.maximum(m, tl.max(s, axis=0))
        alpha = tl.exp(m - m_new)
        d = tl.maximum(s - m_new, -1.0e4)
        e = tl.exp(d)
        if ENTROPY:
            E = alpha * (E + (m - m_new) * S) + tl.sum(e * d, axis=0)
        S = S * alpha + tl.sum(e, axis=0)
        hit = cols < 0
        if K > 0:  # only the (sorted) ids that fall in this block: ~k / n_blocks compares per column
            blk_i = start // BLOCK_V
            lo = tl.load(bnd_row + blk_i)
            hi = tl.load(bnd_row + blk_i + 1)
            for i in range(lo, hi):
                hit = hit | (cols == tl.load(sid_row + i))
        R = R * alpha + tl.sum(tl.where(hit, 0.0, e), axis=0)
        m = m_new

    log_s = tl.log(S)
    lse = m + log_s
    tl.store(lse_ptr + pid, lse)
    tl.store(lrest_ptr + pid, tl.maximum(tl.log(R) - log_s, log_rest_floor))
    if ENTROPY:
        tl.store(ent_ptr + pid, log_s - E / S)
    for i in range(K):
        idv = tl.load(id_row + i).to(tl.int64)
        sv = tl.load(x_row + idv).to(tl.float32) * inv_t
        tl.store(logp_ptr + pid * stride_logp + i, sv - lse)


@triton.jit
def _topk_lse_bwd_kernel(
    x_ptr,
    stride_x,
    rows_ptr,
    sids_ptr,
    stride_ids,
    bnd_ptr,
    stride_bnd,
    gid_ptr,
    stride_gid,
    a_ptr,
    b_ptr,
    gh_ptr,
    lse_ptr,
    gx_ptr,
    stride_gx,
    V,
    inv_t,
    K: tl.constexpr,
    BLOCK_V: tl.constexpr,
    HAS_ROWS: tl.constexpr,
    HAS_GH: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    if HAS_ROWS:
        row = tl.load(rows_ptr + pid).to(tl.int64)
    else:
        row = pid
    x_row = x_ptr + row * stride_x
    gx_row = gx_ptr + row * stride_gx
    sid_row = sids_ptr + pid * stride_ids
    bnd_row = bnd_ptr + pid * stride_bnd
    gid_row = gid_ptr + pid * stride_gid
    offs = tl.arange(0, BLOCK_V)

    lse = tl.load(lse_ptr + pid)
    a = tl.load(a_ptr + pid)
    b = tl.load(b_ptr + pid)
    gh = tl.load(gh_ptr + pid)  # a valid dummy row when not HAS_GH (then unused)
    for start in range(0, V, BLOCK_V):
        cols = start + offs
        inb = cols < V
        s = tl.load(x_row + cols, mask=inb, other=0.0).to(tl.float32) * inv_t
        s = tl.maximum(s, lse - 1.0e4)  # -inf logits: p = 0 and gH * s stays finite
        p = tl.exp(s - lse)
        hit = cols < 0
        gsum = tl.zeros([BLOCK_V], dtype=tl.float32)
        if K > 0:
            blk_i = start // BLOCK_V
            lo = tl.load(bnd_row + blk_i)
            hi = tl.load(bnd_row + blk_i + 1)
            for i in range(lo, hi):
                eq = cols == tl.load(sid_row + i)
                hit = hit | eq
                gsum += tl.where(eq, tl.load(gid_row + i), 0.0)
        c = a + tl.where(hit, 0.0, b)
        if HAS_GH:
            c = c - gh * s
        g = (p * c + gsum) * inv_t
        tl.store(gx_row + cols, g.to(gx_ptr.dtype.element_ty), mask=inb)


def _block_v(vocab: int, top_r: int) -> int:
    cap = 1024 if top_r else 4096  # the bitonic top-k of a block is costly: smaller blocks with it
    return max(16, min(cap, triton.next_power_of_2(vocab)))


def _warps(block_v: int) -> int:
    return 8 if block_v >= 2048 else 4


def _bucket_ids(ids: torch.Tensor, vocab: int, block_v: int):
    """Ids sorted per row, the sort order, and per row the index range of the sorted ids that
    fall in each vocabulary block: ``bounds[m, b] .. bounds[m, b + 1]`` (int32, [M, NB + 1])."""
    sids, order = ids.sort(dim=1)
    nb = triton.cdiv(vocab, block_v)
    starts = torch.arange(nb + 1, device=ids.device, dtype=sids.dtype) * block_v
    bounds = torch.searchsorted(sids.contiguous(), starts.expand(ids.shape[0], nb + 1).contiguous())
    return sids.contiguous(), order, bounds.to(torch.int32).contiguous()


def triton_forward(x: torch.Tensor, ids: torch.Tensor, rows: Optional[torch.Tensor], inv_t: float, want_entropy: bool, top_r: int):
    """x: [N, V] with unit column stride; ids: [M, k] int64 for the computed rows."""
    if x.stride(1) != 1:
        raise ValueError("the Triton backend needs logits with a unit stride on the vocabulary dimension")
    n_out = x.shape[0] if rows is None else rows.numel()
    vocab = x.shape[1]
    k = ids.shape[1]
    dev = x.device
    lse = _empty((n_out,), device=dev, dtype=torch.float32)
    logp = _empty((n_out, k), device=dev, dtype=torch.float32)
    log_rest = _empty((n_out,), device=dev, dtype=torch.float32)
    entropy = _empty((n_out,), device=dev, dtype=torch.float32) if want_entropy else None
    block_v = _block_v(vocab, top_r)
    nb = triton.cdiv(vocab, block_v)
    r_pad = 0
    cand = None
    if top_r:
        r_pad = min(triton.next_power_of_2(top_r), block_v)
        cand = _empty((n_out, nb, r_pad), device=dev, dtype=torch.float32)
    if n_out == 0:
        top = lse.new_empty((0, top_r)) if top_r else None
        return lse, logp, log_rest, entropy, top
    if k:
        ids_c = ids.contiguous()
        sids, _, bounds = _bucket_ids(ids_c, vocab, block_v)
    else:  # any valid tensors (never read)
        ids_c, sids, bounds = lse, lse, lse
    _topk_lse_fwd_kernel[(n_out,)](
        x,
        x.stride(0),
        rows if rows is not None else lse,
        ids_c,
        ids_c.stride(0) if k else 0,
        sids,
        bounds,
        bounds.stride(0) if k else 0,
        lse,
        logp if k else lse,
        logp.stride(0) if k else 0,
        log_rest,
        entropy if entropy is not None else lse,
        cand if cand is not None else lse,
        vocab,
        nb,
        float(inv_t),
        float(LOG_REST_FLOOR),
        K=k,
        BLOCK_V=block_v,
        HAS_ROWS=rows is not None,
        ENTROPY=bool(want_entropy),
        TOP_R=r_pad,
        num_warps=_warps(block_v),
    )
    top_probs = None
    if top_r:
        vals = cand.reshape(n_out, nb * r_pad).topk(top_r, dim=1).values
        top_probs = torch.exp(vals - lse[:, None])
    return lse, logp, log_rest, entropy, top_probs


def triton_backward(x, ids, rows, inv_t, lse, A, B, g_h, g_logp) -> torch.Tensor:
    """Gradient w.r.t. the logits (same shape and dtype as ``x``)."""
    n_out = lse.numel()
    vocab = x.shape[1]
    k = ids.shape[1]
    if rows is None:
        gx = _empty(x.shape, device=x.device, dtype=x.dtype)
    else:
        gx = torch.zeros(x.shape, device=x.device, dtype=x.dtype)
    if n_out == 0:
        return gx
    a = A.to(torch.float32).contiguous()
    b = (B if B is not None else torch.zeros_like(A)).to(torch.float32).contiguous()
    gh = g_h.to(torch.float32).contiguous() if g_h is not None else a
    block_v = _block_v(vocab, 0)
    if k:
        sids, order, bounds = _bucket_ids(ids.contiguous(), vocab, block_v)
        gid = g_logp if g_logp is not None else torch.zeros((n_out, k), device=x.device)
        gid = gid.to(torch.float32).gather(1, order).contiguous()  # aligned with the sorted ids
    else:
        sids, bounds, gid = a, a, a
    _topk_lse_bwd_kernel[(n_out,)](
        x,
        x.stride(0),
        rows if rows is not None else a,
        sids,
        sids.stride(0) if k else 0,
        bounds,
        bounds.stride(0) if k else 0,
        gid,
        gid.stride(0) if k else 0,
        a,
        b,
        gh,
        lse.contiguous(),
        gx,
        gx.stride(0),
        vocab,
        float(inv_t),
        K=k,
        BLOCK_V=block_v,
        HAS_ROWS=rows is not None,
        HAS_GH=g_h is not None,
        num_warps=_warps(block_v),
    )
    return gx
