"""Chunked log-softmax statistics at given token ids, without a saved ``[N, V]`` fp32 tensor.

From logits ``z`` ``[N, V]`` (or hidden states ``h`` ``[N, H]`` and an LM head ``W`` ``[V, H]``, with
``z = h W^T`` formed one vocabulary chunk at a time) and a temperature ``T``, with ``s = z / T``:

============  =========  ==================================================================
output        shape      value
============  =========  ==================================================================
``lse``       [N]        ``logsumexp_j s_j``
``logp``      [N, k]     ``s[ids] - lse`` (log-probs of the k given ids)
``log_rest``  [N]        ``log(1 - sum_i p[ids_i])``, computed *by exclusion* (the sum of the
                         probabilities of every token not in ``ids``), so it stays accurate when
                         the top-k mass is ~1; clamped below at :data:`LOG_REST_FLOOR`
                         (= log 1e-30); the gradient through a clamped value is 0
``entropy``   [N]        ``-sum_j p_j log p_j`` (only with ``entropy=True``; differentiable)
``top_probs`` [N, r]     the r largest probabilities, descending (only with ``top_r=r``;
                         no gradient), from a running top-r merge across vocabulary chunks
============  =========  ==================================================================

All outputs are fp32 (fp64 for fp64 inputs). ``ids`` of one row should be distinct (they are a
stored top-k support); ``log_rest`` treats them as a set, ``logp`` gathers each one.

Memory. Forward streams the vocabulary in ``[rows, chunk]`` blocks with an online (running-max)
logsumexp / entropy / rest-mass accumulation, and saves only the inputs (which exist anyway) and the
``[N]`` / ``[N, k]`` results for autograd. Backward recomputes each block's softmax and writes the
input gradient block by block::

    dL/ds_j = p_j * (A + B * [j not in ids] - gH * s_j) + sum_{i: ids_i = j} g_logp_i
    A = g_lse - sum_i g_logp_i - g_rest + gH * (lse - H),   B = g_rest / rest,   dL/dz = dL/ds / T

so the only ``[N, V]`` tensor ever allocated is the gradient itself (in the logits' dtype); block
temporaries are bounded by ``block_elems`` (default ``clamp(N*V/128, 2^18, 2^23)`` elements, i.e. about
2 fp32 words + 1 byte per element of that block). With ``rows`` the selected rows are read in place
(``index_select`` one block at a time, never an ``[M, V]`` copy), but the gradient is still the
full ``[N, V]`` (zero outside ``rows``): autograd wants a dense gradient of the input's shape, and
every consumer upstream (the engine's temperature division, the LM head's matmul backward) needs a
dense ``dL/dz`` anyway, into which verl's own ``[N, V]`` log-prob gradient is summed. A row-sparse
gradient would need sparse support in each of those backward functions, so it is not offered.

Backends (same API, same outputs):

* ``torch``: chunked torch ops, any device, logits or hidden-state input;
* ``triton`` (:mod:`dyjr_verl.kernels._triton_topk`): one program per row streaming the vocabulary,
  logits input only. Used only when chosen (``backend="triton"`` or ``DYJR_TOPK_BACKEND=triton``):
  ``auto`` is the torch backend everywhere until a GPU check is recorded (``TRITON_GPU_VERIFIED``),
  and a Triton compile or launch failure falls back to torch with one warning. **The Triton path has been checked only in
  Triton's CPU interpreter (``TRITON_INTERPRET=1``, see tests/test_topk_kernel.py), never compiled on a
  GPU; run ``python benchmarks/bench_topk_kernel.py --device cuda --check`` on a GPU before relying on it.**
"""

from __future__ import annotations

import math
import os
from typing import NamedTuple, Optional

import torch

__all__ = [
    "LOG_REST_FLOOR",
    "TopKLogSoftmaxOutput",
    "topk_log_softmax",
    "topk_log_softmax_from_hidden",
    "triton_available",
    "default_block_elems",
]

#: log of the smallest rest mass reported (1e-30, a normal fp32 number); below it ``log_rest`` is
#: clamped and carries no gradient.
LOG_REST_FLOOR = math.log(1e-30)
#: initial running max: finite, so ``(m_old - m_new) * S_old`` is ``0 * finite`` on the first block.
_M_INIT = -1.0e30
#: ``s - m`` is clamped to this before ``exp`` so masked / ``-inf`` logits give ``e = 0`` and
#: ``e * (s - m) = 0`` (never ``0 * -inf``).
_D_FLOOR = -1.0e4
BACKEND_ENV = "DYJR_TOPK_BACKEND"
_BACKENDS = ("auto", "torch", "triton")

# Tests set this to True: every buffer the backends allocate is then pre-filled with NaN, so an
# output element that is never written shows up as NaN.
_POISON_ALLOC = False


class TopKLogSoftmaxOutput(NamedTuple):
    lse: torch.Tensor
    logp: torch.Tensor
    log_rest: torch.Tensor
    entropy: Optional[torch.Tensor]
    top_probs: Optional[torch.Tensor]


def _empty(shape, *, device, dtype) -> torch.Tensor:
    t = torch.empty(shape, device=device, dtype=dtype)
    if _POISON_ALLOC and t.is_floating_point():
        t.fill_(float("nan"))
    return t


def default_block_elems(rows: int, vocab: int) -> int:
    """Elements per ``[rows, chunk]`` block: small against the whole problem (<= 1/128 of it, so the
    fp32 block temporaries stay a few percent of a bf16 logits tensor), but at least 2^18 so the
    per-block overhead (op launches, thread-pool barriers on CPU) stays small, and at most 2^23."""
    return int(min(1 << 23, max(1 << 18, (rows * vocab) // 128)))


def triton_available() -> bool:
    """Triton imports and CUDA is usable (the condition for ``backend='auto'`` to pick Triton)."""
    if not torch.cuda.is_available():
        return False
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception:
        return False
    return True


def _triton_has_topk() -> bool:
    try:
        import triton.language as tl
    except Exception:
        return False
    return hasattr(tl, "topk")


#: Flip to True only together with a committed ``benchmarks/topk_kernel_gpu.md`` in which
#: ``bench_topk_kernel.py --device cuda --check`` passed; until then ``auto`` never picks Triton.
TRITON_GPU_VERIFIED = False
_TRITON_FAILED: list[str] = []  # the first Triton failure of this process (then torch for the rest)


def _triton_failed(exc: BaseException) -> None:
    import warnings

    if not _TRITON_FAILED:
        _TRITON_FAILED.append(f"{type(exc).__name__}: {exc}")
        warnings.warn(f"dyjr-verl: Triton top-k kernel failed ({_TRITON_FAILED[0].splitlines()[0][:200]}); "
                      "using the torch backend for the rest of this process", RuntimeWarning, stacklevel=3)


def _resolve_backend(backend: str, device: torch.device, hidden: bool) -> str:
    if backend not in _BACKENDS:
        raise ValueError(f"backend must be one of {_BACKENDS}, got {backend!r}")
    env = os.environ.get(BACKEND_ENV, "").strip().lower()
    if env:
        if env not in _BACKENDS:
            raise ValueError(f"${BACKEND_ENV} must be one of {_BACKENDS}, got {env!r}")
        if backend == "auto":
            backend = env
    if hidden:
        if backend == "triton":
            raise ValueError("the hidden-state path has only the torch backend (matmuls go to cuBLAS anyway)")
        return "torch"
    if backend == "auto":
        verified = TRITON_GPU_VERIFIED and device.type == "cuda" and triton_available()
        backend = "triton" if verified else "torch"
    if backend == "triton" and _TRITON_FAILED:
        return "torch"
    if backend == "triton" and device.type != "cuda":
        if os.environ.get("TRITON_INTERPRET", "0") not in ("1", "true", "True"):
            raise ValueError("backend='triton' needs CUDA tensors (or TRITON_INTERPRET=1 for Triton's CPU interpreter)")
    return backend


# ----------------------------------------------------------------------------------------------
# block sources: where a [rows, cols] block of scaled logits comes from, where its gradient goes
# ----------------------------------------------------------------------------------------------


class _LogitsSource:
    """Blocks of ``logits[rows, c0:c1] / T`` (``rows`` optional row subset)."""

    def __init__(self, logits: torch.Tensor, rows: Optional[torch.Tensor], inv_t: float):
        self.x = logits
        self.rows = rows
        self.inv_t = inv_t
        self.n = logits.shape[0] if rows is None else rows.numel()
        self.vocab = logits.shape[1]
        self.device = logits.device
        self.cdtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
        self.grad: Optional[torch.Tensor] = None

    def block(self, r0: int, r1: int, c0: int, c1: int, ws: Optional["_Workspace"] = None) -> torch.Tensor:
        if self.rows is None:
            src = self.x[r0:r1, c0:c1]
        else:
            src = self.x[:, c0:c1].index_select(0, self.rows[r0:r1])
        if ws is None:
            s = src.to(self.cdtype, copy=True)  # always a fresh, writable tensor
        else:
            s = ws.view(0, r1 - r0, c1 - c0).copy_(src)
        if self.inv_t != 1.0:
            s.mul_(self.inv_t)
        return s

    def begin_backward(self) -> None:
        if self.rows is None:
            self.grad = _empty(self.x.shape, device=self.device, dtype=self.x.dtype)
        else:  # rows outside the subset get an exact zero gradient
            self.grad = torch.zeros(self.x.shape, device=self.device, dtype=self.x.dtype)

    def write_grad(self, r0: int, r1: int, c0: int, c1: int, g: torch.Tensor) -> None:
        if self.rows is None:
            self.grad[r0:r1, c0:c1].copy_(g)
        else:
            self.grad[:, c0:c1].index_copy_(0, self.rows[r0:r1], g.to(self.grad.dtype))

    def end_chunk(self, c0: int, c1: int) -> None:
        pass

    def grads(self):
        return self.grad, None


class _HiddenSource:
    """Blocks of ``(hidden[rows] @ weight[c0:c1].T) / T``; gradients accumulated in fp32."""

    def __init__(self, hidden: torch.Tensor, weight: torch.Tensor, rows: Optional[torch.Tensor], inv_t: float):
        self.h = hidden
        self.w = weight
        self.rows = rows
        self.inv_t = inv_t
        self.n = hidden.shape[0] if rows is None else rows.numel()
        self.vocab = weight.shape[0]
        self.device = hidden.device
        self.mm_dtype = torch.promote_types(hidden.dtype, weight.dtype)
        self.cdtype = torch.float64 if self.mm_dtype == torch.float64 else torch.float32
        self.need_gh = hidden.requires_grad
        self.need_gw = weight.requires_grad
        self.gh: Optional[torch.Tensor] = None
        self.gw: Optional[torch.Tensor] = None
        self.gw_chunk: Optional[torch.Tensor] = None

    def _h(self, r0: int, r1: int) -> torch.Tensor:
        h = self.h[r0:r1] if self.rows is None else self.h.index_select(0, self.rows[r0:r1])
        return h.to(self.mm_dtype)

    def block(self, r0: int, r1: int, c0: int, c1: int, ws: Optional["_Workspace"] = None) -> torch.Tensor:
        z = self._h(r0, r1) @ self.w[c0:c1].to(self.mm_dtype).T  # a fresh tensor
        s = z if z.dtype == self.cdtype else z.to(self.cdtype)
        if self.inv_t != 1.0:
            s.mul_(self.inv_t)
        return s

    def begin_backward(self) -> None:
        acc = self.cdtype
        if self.need_gh:
            self.gh = torch.zeros((self.n, self.h.shape[1]), device=self.device, dtype=acc)
        if self.need_gw:
            self.gw = _empty(self.w.shape, device=self.device, dtype=self.w.dtype)

    def write_grad(self, r0: int, r1: int, c0: int, c1: int, g: torch.Tensor) -> None:
        gm = g.to(self.mm_dtype)
        if self.need_gh:
            self.gh[r0:r1] += (gm @ self.w[c0:c1].to(self.mm_dtype)).to(self.gh.dtype)
        if self.need_gw:
            if self.gw_chunk is None:
                self.gw_chunk = torch.zeros((c1 - c0, self.w.shape[1]), device=self.device, dtype=self.cdtype)
            self.gw_chunk += (gm.T @ self._h(r0, r1)).to(self.cdtype)

    def end_chunk(self, c0: int, c1: int) -> None:
        if self.gw is not None:
            if self.gw_chunk is None:  # no rows at all
                self.gw[c0:c1].zero_()
            else:
                self.gw[c0:c1].copy_(self.gw_chunk)
            self.gw_chunk = None

    def grads(self):
        gh = None
        if self.need_gh:
            if self.rows is None:
                gh = self.gh.to(self.h.dtype).reshape(self.h.shape)
            else:
                gh = torch.zeros(self.h.shape, device=self.device, dtype=self.h.dtype)
                gh.index_copy_(0, self.rows, self.gh.to(self.h.dtype))
        return gh, self.gw


# ----------------------------------------------------------------------------------------------
# torch backend
# ----------------------------------------------------------------------------------------------


class _Workspace:
    """Block buffers allocated once per call (two compute-dtype blocks and one bool block), so
    the torch backend's temporaries neither grow with the number of blocks nor churn the
    allocator."""

    def __init__(self, rows: int, cols: int, device, dtype):
        self.f = [torch.empty(rows * cols, device=device, dtype=dtype) for _ in range(2)]
        self.b = torch.empty(rows * (cols + 1), device=device, dtype=torch.bool)

    def view(self, i: int, rows: int, cols: int) -> torch.Tensor:
        return self.f[i][: rows * cols].view(rows, cols)

    def bool_view(self, rows: int, cols: int) -> torch.Tensor:
        return self.b[: rows * cols].view(rows, cols)


def _hit_mask(loc: torch.Tensor, valid: torch.Tensor, width: int, ws: Optional[_Workspace] = None) -> torch.Tensor:
    """[rows, width] bool: True at the columns named by ``loc`` where ``valid``."""
    if ws is None:
        hit = torch.zeros((loc.shape[0], width + 1), dtype=torch.bool, device=loc.device)
    else:
        hit = ws.bool_view(loc.shape[0], width + 1).zero_()
    hit.scatter_(1, torch.where(valid, loc, torch.full_like(loc, width)), True)
    return hit[:, :width]


def _torch_forward(src, ids: torch.Tensor, want_entropy: bool, top_r: int, chunk: int, row_block: int):
    n, vocab, dev, cd = src.n, src.vocab, src.device, src.cdtype
    k = ids.shape[1]
    m = torch.full((n,), _M_INIT, device=dev, dtype=cd)
    S = torch.zeros(n, device=dev, dtype=cd)
    R = torch.zeros(n, device=dev, dtype=cd) if k else S
    E = torch.zeros(n, device=dev, dtype=cd) if want_entropy else None
    sid = _empty((n, k), device=dev, dtype=cd)
    top = torch.full((n, top_r), float("-inf"), device=dev, dtype=cd) if top_r else None
    ws = _Workspace(min(row_block, n), min(chunk, vocab), dev, cd) if isinstance(src, _LogitsSource) and n else None
    for c0 in range(0, vocab, chunk):
        c1 = min(c0 + chunk, vocab)
        width = c1 - c0
        for r0 in range(0, n, row_block):
            r1 = min(r0 + row_block, n)
            s = src.block(r0, r1, c0, c1, ws)
            if k:
                loc = ids[r0:r1] - c0
                valid = (loc >= 0) & (loc < width)
                got = s.gather(1, loc.clamp(0, width - 1))
                sid[r0:r1] = torch.where(valid, got, sid[r0:r1])
            if top_r:
                tv = s.topk(min(top_r, width), dim=1).values
                top[r0:r1] = torch.cat([top[r0:r1], tv], dim=1).topk(top_r, dim=1).values
            m_old = m[r0:r1]
            m_new = torch.maximum(m_old, s.amax(dim=1))
            alpha = torch.exp(m_old - m_new)
            d = s.sub_(m_new[:, None])
            if E is not None:  # the entropy needs e * d finite: 0 * (-inf) must not happen
                d.clamp_(min=_D_FLOOR)
            e = torch.exp(d) if ws is None else torch.exp(d, out=ws.view(1, r1 - r0, width))
            S_old = S[r0:r1].clone()
            S[r0:r1] = S_old * alpha + e.sum(dim=1)
            if E is not None:
                E[r0:r1] = alpha * (E[r0:r1] + (m_old - m_new) * S_old) + d.mul_(e).sum(dim=1)
            if k:
                e.masked_fill_(_hit_mask(loc, valid, width, ws), 0.0)
                R[r0:r1] = R[r0:r1] * alpha + e.sum(dim=1)
            m[r0:r1] = m_new
            del s, d, e
        src.end_chunk(c0, c1)
    log_s = torch.log(S)
    lse = m + log_s
    logp = sid - lse[:, None]
    log_rest = (torch.log(R) - log_s).clamp(min=LOG_REST_FLOOR) if k else torch.zeros_like(lse)
    entropy = (log_s - E / S) if E is not None else None
    top_probs = torch.exp(top - lse[:, None]) if top_r else None
    return lse, logp, log_rest, entropy, top_probs


def _first_occurrence(ids: torch.Tensor) -> torch.Tensor:
    """[n, k] bool: ids[:, i] does not occur in ids[:, :i]."""
    k = ids.shape[1]
    if k <= 1:
        return torch.ones_like(ids, dtype=torch.bool)
    eq = ids[:, :, None] == ids[:, None, :]
    before = torch.ones(k, k, dtype=torch.bool, device=ids.device).tril(diagonal=-1)
    return ~(eq & before).any(dim=2)


def _backward_coefficients(lse, logp, log_rest, entropy, g_lse, g_logp, g_rest, g_ent, ids):
    """Per-row A, B, gH and per-id corrections (see the module docstring)."""
    cd = lse.dtype
    A = torch.zeros_like(lse)
    B = None
    if g_lse is not None:
        A = A + g_lse.to(cd)
    if g_logp is not None and g_logp.numel():
        A = A - g_logp.to(cd).sum(dim=1)
    if g_rest is not None and ids.shape[1]:
        g_r = torch.where(log_rest > LOG_REST_FLOOR, g_rest.to(cd), torch.zeros_like(lse))
        A = A - g_r
        B = g_r * torch.exp(-log_rest)
    g_h = None
    if g_ent is not None:
        g_h = g_ent.to(cd)
        A = A + g_h * (lse - entropy)
    corr = None  # value added at each id column (once per distinct id for the B part)
    if ids.shape[1] and (g_logp is not None or B is not None):
        corr = torch.zeros_like(logp)
        if g_logp is not None:
            corr = corr + g_logp.to(cd)
        if B is not None:
            corr = corr - (B[:, None] * torch.exp(logp)) * _first_occurrence(ids)
    return A, B, g_h, corr


def _torch_backward(src, ids, lse, A, B, g_h, corr, chunk: int, row_block: int) -> None:
    n, vocab = src.n, src.vocab
    src.begin_backward()
    AB = A if B is None else A + B
    ws = _Workspace(min(row_block, n), min(chunk, vocab), src.device, src.cdtype) if isinstance(src, _LogitsSource) and n else None
    for c0 in range(0, vocab, chunk):
        c1 = min(c0 + chunk, vocab)
        width = c1 - c0
        for r0 in range(0, n, row_block):
            r1 = min(r0 + row_block, n)
            s = src.block(r0, r1, c0, c1, ws)
            if g_h is not None:  # -inf logits: p = 0 there; keep s finite so p * (... - gH * s) is 0, not NaN
                torch.maximum(s, lse[r0:r1, None] + _D_FLOOR, out=s)
            if ws is None:
                p = torch.sub(s, lse[r0:r1, None]).exp_()
            else:
                p = torch.sub(s, lse[r0:r1, None], out=ws.view(1, r1 - r0, width)).exp_()
            if g_h is not None:
                c = s.mul_(-g_h[r0:r1, None]).add_(AB[r0:r1, None])
                g = p.mul_(c)
            else:
                g = p.mul_(AB[r0:r1, None])
            if corr is not None:
                loc = ids[r0:r1] - c0
                valid = (loc >= 0) & (loc < width)
                g.scatter_add_(1, loc.clamp(0, width - 1), torch.where(valid, corr[r0:r1], torch.zeros_like(corr[r0:r1])))
            if src.inv_t != 1.0:
                g.mul_(src.inv_t)
            src.write_grad(r0, r1, c0, c1, g)
            del s, p, g
        src.end_chunk(c0, c1)


# ----------------------------------------------------------------------------------------------
# autograd
# ----------------------------------------------------------------------------------------------


class _TopKLogSoftmaxFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w, ids, rows, inv_t, want_entropy, top_r, chunk, row_block, backend):
        ctx.set_materialize_grads(False)
        with torch.autocast(device_type=x.device.type, enabled=False):
            out = None
            if backend == "triton":
                from dyjr_verl.kernels import _triton_topk

                try:
                    out = _triton_topk.triton_forward(x, ids, rows, inv_t, want_entropy, top_r)
                except Exception as exc:  # compile/launch failure: torch computes the same outputs
                    _triton_failed(exc)
                    backend = "torch"
            if out is not None:
                lse, logp, log_rest, entropy, top_probs = out
            else:
                src = _LogitsSource(x, rows, inv_t) if w is None else _HiddenSource(x, w, rows, inv_t)
                lse, logp, log_rest, entropy, top_probs = _torch_forward(src, ids, want_entropy, top_r, chunk, row_block)
        if entropy is None:
            entropy = lse.new_empty(0)
        if top_probs is None:
            top_probs = lse.new_empty(0)
        ctx.mark_non_differentiable(top_probs)
        if not want_entropy:
            ctx.mark_non_differentiable(entropy)
        ctx.save_for_backward(x, w, ids, rows, lse, logp, log_rest, entropy if want_entropy else None)
        ctx.cfg = (inv_t, want_entropy, chunk, row_block, backend, x.requires_grad, w is not None and w.requires_grad)
        return lse, logp, log_rest, entropy, top_probs

    @staticmethod
    def backward(ctx, g_lse, g_logp, g_rest, g_ent, g_top):
        x, w, ids, rows, lse, logp, log_rest, entropy = ctx.saved_tensors
        inv_t, want_entropy, chunk, row_block, backend, need_x, need_w = ctx.cfg
        if not want_entropy:
            g_ent = None
        if g_lse is None and g_logp is None and g_rest is None and g_ent is None:
            return (None,) * 10
        with torch.autocast(device_type=x.device.type, enabled=False):
            A, B, g_h, corr = _backward_coefficients(lse, logp, log_rest, entropy, g_lse, g_logp, g_rest, g_ent, ids)
            gx = None
            if backend == "triton":
                from dyjr_verl.kernels import _triton_topk

                try:
                    gx, gw = _triton_topk.triton_backward(x, ids, rows, inv_t, lse, A, B, g_h, g_logp), None
                except Exception as exc:
                    _triton_failed(exc)
            if gx is None:
                src = _LogitsSource(x, rows, inv_t) if w is None else _HiddenSource(x, w, rows, inv_t)
                if w is not None:
                    src.need_gh, src.need_gw = need_x, need_w
                _torch_backward(src, ids, lse, A, B, g_h, corr, chunk, row_block)
                gx, gw = src.grads()
        return (gx if need_x else None), (gw if need_w else None), None, None, None, None, None, None, None, None


# ----------------------------------------------------------------------------------------------
# public API
# ----------------------------------------------------------------------------------------------


def _prepare(ids, lead_shape, n_rows, device, rows, vocab):
    if ids is None:
        ids2 = torch.zeros((n_rows, 0), dtype=torch.long, device=device)
    else:
        if ids.is_floating_point() or ids.is_complex():
            raise TypeError(f"ids must be an integer tensor, got {ids.dtype}")
        if tuple(ids.shape[:-1]) != tuple(lead_shape):
            raise ValueError(f"ids {tuple(ids.shape)} must have the leading shape {tuple(lead_shape)} of the input")
        ids2 = ids.reshape(n_rows, ids.shape[-1]).to(device=device, dtype=torch.long)
        if ids2.numel():
            lo, hi = (int(v) for v in torch.aminmax(ids2))
            if lo < 0 or hi >= vocab:
                raise ValueError(f"ids must lie in [0, {vocab}), got values in [{lo}, {hi}]")
    rows2 = None
    if rows is not None:
        rows2 = torch.as_tensor(rows, device=device).reshape(-1).to(torch.long)
        if rows2.numel() and (int(rows2.min()) < 0 or int(rows2.max()) >= n_rows):
            raise ValueError(f"rows must lie in [0, {n_rows})")
        ids2 = ids2.index_select(0, rows2)
    return ids2.contiguous(), rows2


def _finish(out, lead_shape, rows, entropy: bool, top_r: int) -> TopKLogSoftmaxOutput:
    lse, logp, log_rest, ent, top = out
    if rows is None:
        lse = lse.reshape(lead_shape)
        log_rest = log_rest.reshape(lead_shape)
        logp = logp.reshape(*lead_shape, logp.shape[-1])
        ent = ent.reshape(lead_shape) if entropy else None
        top = top.reshape(*lead_shape, top_r) if top_r else None
    else:
        ent = ent if entropy else None
        top = top if top_r else None
    return TopKLogSoftmaxOutput(lse, logp, log_rest, ent, top)


def _sizes(n: int, vocab: int, chunk_size: Optional[int], block_elems: Optional[int]) -> tuple[int, int]:
    chunk = int(chunk_size) if chunk_size else min(vocab, 8192)
    chunk = max(1, min(chunk, vocab))
    elems = int(block_elems) if block_elems else default_block_elems(max(n, 1), vocab)
    return chunk, max(1, elems // chunk)


def topk_log_softmax(
    logits: torch.Tensor,
    ids: Optional[torch.Tensor] = None,
    *,
    temperature: float = 1.0,
    rows: Optional[torch.Tensor] = None,
    entropy: bool = False,
    top_r: int = 0,
    backend: str = "auto",
    chunk_size: Optional[int] = None,
    block_elems: Optional[int] = None,
) -> TopKLogSoftmaxOutput:
    """Log-softmax statistics of ``logits / temperature`` at ``ids``, streamed over the vocabulary.

    Args:
        logits: ``[..., V]`` float (bf16/fp16/fp32/fp64); gradients flow back to it.
        ids: ``[..., k]`` integer ids (k >= 0, distinct per row), or None (k = 0; then
            ``log_rest`` = 0).
        temperature: > 0; the distribution is ``softmax(logits / temperature)``.
        rows: optional 1-D indices into the flattened leading dims: only those rows are computed
            (outputs are then ``[M]`` / ``[M, k]``; the other rows get a zero gradient). Use it to
            skip prompt / fresh / padding positions.
        entropy: also return the per-position entropy (differentiable).
        top_r: also return the ``top_r`` largest probabilities, descending (no gradient).
        backend: ``auto`` (Triton for CUDA tensors when available, else torch), ``torch`` or
            ``triton``; ``$DYJR_TOPK_BACKEND`` overrides ``auto``.
        chunk_size: vocabulary chunk of the torch backend (default min(V, 8192)).
        block_elems: elements per ``[rows, chunk]`` block of the torch backend (see
            :func:`default_block_elems`).

    Returns:
        :class:`TopKLogSoftmaxOutput` ``(lse, logp, log_rest, entropy, top_probs)``.
    """
    if not logits.is_floating_point():
        raise TypeError(f"logits must be floating point, got {logits.dtype}")
    if logits.dim() < 1 or logits.shape[-1] < 1:
        raise ValueError(f"logits must have a non-empty last (vocabulary) dimension, got {tuple(logits.shape)}")
    if not (temperature > 0 and math.isfinite(temperature)):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
    vocab = logits.shape[-1]
    top_r = int(top_r)
    if top_r < 0:
        raise ValueError(f"top_r must be >= 0, got {top_r}")
    top_r = min(top_r, vocab)
    lead = tuple(logits.shape[:-1])
    n = math.prod(lead)
    x = logits.reshape(n, vocab)
    be = _resolve_backend(backend, x.device, hidden=False)
    if be == "triton" and top_r and backend == "auto" and not _triton_has_topk():
        be = "torch"  # Triton builds without tl.topk (older than 3.3-ish): top-r diagnostics on torch
    if be == "triton" and x.stride(1) != 1:
        x = x.contiguous()
    ids2, rows2 = _prepare(ids, lead, n, x.device, rows, vocab)
    chunk, row_block = _sizes(n if rows2 is None else rows2.numel(), vocab, chunk_size, block_elems)
    out = _TopKLogSoftmaxFn.apply(x, None, ids2, rows2, 1.0 / float(temperature), bool(entropy), top_r, chunk, row_block, be)
    return _finish(out, lead, rows2, bool(entropy), top_r)


def topk_log_softmax_from_hidden(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    ids: Optional[torch.Tensor] = None,
    *,
    temperature: float = 1.0,
    rows: Optional[torch.Tensor] = None,
    entropy: bool = False,
    top_r: int = 0,
    chunk_size: Optional[int] = None,
    block_elems: Optional[int] = None,
) -> TopKLogSoftmaxOutput:
    """As :func:`topk_log_softmax` for ``logits = hidden @ weight.T`` (an LM head without bias),
    formed one ``[rows, chunk]`` block at a time in forward and again in backward: no ``[N, V]``
    tensor exists at any point. Gradients flow to ``hidden`` ``[..., H]`` and ``weight`` ``[V, H]``
    (accumulated in fp32, returned in their dtypes). Matmuls run in the promoted input dtype
    (bf16 tensor cores on GPU), the softmax statistics in fp32. Torch backend only."""
    if not (hidden.is_floating_point() and weight.is_floating_point()):
        raise TypeError("hidden and weight must be floating point")
    if weight.dim() != 2 or hidden.shape[-1] != weight.shape[1]:
        raise ValueError(f"need hidden [..., H] and weight [V, H], got {tuple(hidden.shape)} and {tuple(weight.shape)}")
    if not (temperature > 0 and math.isfinite(temperature)):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
    vocab = weight.shape[0]
    top_r = min(int(top_r), vocab)
    if top_r < 0:
        raise ValueError(f"top_r must be >= 0, got {top_r}")
    lead = tuple(hidden.shape[:-1])
    n = math.prod(lead)
    h = hidden.reshape(n, hidden.shape[-1])
    _resolve_backend("torch", h.device, hidden=True)
    ids2, rows2 = _prepare(ids, lead, n, h.device, rows, vocab)
    chunk, row_block = _sizes(n if rows2 is None else rows2.numel(), vocab, chunk_size, block_elems)
    out = _TopKLogSoftmaxFn.apply(h, weight, ids2, rows2, 1.0 / float(temperature), bool(entropy), top_r, chunk, row_block, "torch")
    return _finish(out, lead, rows2, bool(entropy), top_r)
