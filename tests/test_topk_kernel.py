"""The chunked top-k log-softmax kernel against a float64 reference: values and gradients (logits,
hidden states, LM head), bf16 inputs, row subsets, poisoned buffers, rest-mass precision, saved
memory, and the Triton backend in Triton's CPU interpreter."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import dyjr_verl.kernels.topk_logsoftmax as K
from dyjr_verl.kernels import LOG_REST_FLOOR, topk_log_softmax, topk_log_softmax_from_hidden

REPO = Path(__file__).resolve().parents[1]
FIELDS = ("lse", "logp", "log_rest", "entropy")


# many small block ops: see the one_intra_op_thread fixture in conftest.py
pytestmark = pytest.mark.usefixtures("one_intra_op_thread")


def reference(z: torch.Tensor, ids: torch.Tensor, temperature: float, top_r: int = 0, row_chunk: int = 512):
    """float64 reference, row-chunked so that large cases never hold an [N, V] float64 tensor
    beyond one chunk (differentiable when z requires grad)."""
    outs = {f: [] for f in FIELDS + ("top",)}
    for r0 in range(0, z.shape[0], row_chunk):
        s = z[r0 : r0 + row_chunk].double() / temperature
        idc = ids[r0 : r0 + row_chunk].long()
        lp = torch.log_softmax(s, dim=-1)
        outs["lse"].append(torch.logsumexp(s, dim=-1))
        outs["logp"].append(lp.gather(-1, idc))
        if idc.shape[1]:
            rest = torch.logsumexp(lp.scatter(-1, idc, float("-inf")), dim=-1)
        else:
            rest = torch.zeros(s.shape[0], dtype=s.dtype)
        outs["log_rest"].append(rest.clamp(min=LOG_REST_FLOOR))
        outs["entropy"].append(-(lp.exp() * lp).sum(-1))
        if top_r:
            outs["top"].append(lp.exp().topk(top_r, dim=-1).values)
    return {f: torch.cat(v) for f, v in outs.items() if v}


def rand_ids(n, vocab, k, gen):
    if k == 0:
        return torch.zeros((n, 0), dtype=torch.long)
    return torch.argsort(torch.rand(n, vocab, generator=gen), dim=1)[:, :k]


def weights_like(ref, gen):
    return {f: torch.randn(ref[f].shape, generator=gen, dtype=torch.float64) for f in FIELDS}


def objective(out, w):
    vals = {"lse": out.lse, "logp": out.logp, "log_rest": out.log_rest, "entropy": out.entropy}
    return sum((vals[f].double() * w[f]).sum() for f in FIELDS)


def close(a, b, tol):
    """max |a - b| <= tol * max(1, max |b|)"""
    a, b = a.double(), b.double()
    scale = max(1.0, float(b.detach().abs().max())) if b.numel() else 1.0
    err = float((a - b).detach().abs().max()) if b.numel() else 0.0
    assert err <= tol * scale, f"max abs error {err:.3g} > {tol:.1g} * {scale:.3g}"


# (N, V, k, chunk, block_elems)
SMALL = [
    (1, 1, 0, None, None),
    (1, 1, 1, None, None),
    (3, 17, 5, 4, 8),
    (37, 1000, 32, 128, 1000),
    (64, 4099, 16, 1024, 5000),
    (129, 300, 1, None, None),
]


@pytest.mark.parametrize("n,vocab,k,chunk,block", SMALL)
def test_values_and_logit_grads_fp32(n, vocab, k, chunk, block):
    gen = torch.Generator().manual_seed(n * 1000 + vocab + k)
    temperature = float(torch.empty(1).uniform_(0.3, 2.0, generator=gen))
    z = (torch.randn(n, vocab, generator=gen) * 4).requires_grad_()
    ids = rand_ids(n, vocab, k, gen)
    r = min(5, vocab)
    out = topk_log_softmax(z, ids, temperature=temperature, entropy=True, top_r=r, chunk_size=chunk, block_elems=block)
    zz = z.detach().double().requires_grad_()
    ref = reference(zz, ids, temperature, top_r=r)
    for f in FIELDS:
        close(getattr(out, f), ref[f], 5e-6)
    close(out.top_probs, ref["top"], 5e-6)
    assert out.top_probs.requires_grad is False
    w = weights_like(ref, gen)
    (g,) = torch.autograd.grad(objective(out, w), z)
    (g_ref,) = torch.autograd.grad(objective(type(out)(*[ref[f] for f in FIELDS], None), w), zz)
    close(g, g_ref, 5e-6)


def test_leading_dims_and_partial_grads():
    gen = torch.Generator().manual_seed(7)
    z = torch.randn(2, 5, 64, generator=gen).requires_grad_()
    ids = rand_ids(10, 64, 3, gen).reshape(2, 5, 3)
    out = topk_log_softmax(z, ids, temperature=1.3)
    assert out.lse.shape == (2, 5) and out.logp.shape == (2, 5, 3) and out.log_rest.shape == (2, 5)
    assert out.entropy is None and out.top_probs is None
    zz = z.detach().double().requires_grad_()
    ref = reference(zz.reshape(10, 64), ids.reshape(10, 3), 1.3)
    for f, name in (("logp", "logp"), ("log_rest", "log_rest")):  # one output at a time
        (g,) = torch.autograd.grad(getattr(out, name).sum(), z, retain_graph=True)
        (g_ref,) = torch.autograd.grad(ref[f].sum(), zz, retain_graph=True)
        close(g, g_ref, 2e-6)


def test_large_case_fp32():
    """One large CPU case (4096 x 32768, k = 32): forward values; gradient on a row subset."""
    gen = torch.Generator().manual_seed(11)
    n, vocab, k = 4096, 32768, 32
    z = torch.randn(n, vocab, generator=gen) * 3
    ids = torch.randint(0, vocab, (n, k), generator=gen)
    ids = torch.where(torch.arange(k) == 0, z.argmax(dim=1, keepdim=True), ids)  # include the mode
    ids[:, 1:] = (ids[:, :1] + 1 + torch.arange(k - 1)) % vocab  # distinct
    out = topk_log_softmax(z, ids, temperature=0.8, entropy=True, top_r=8)
    rows = torch.arange(0, n, 8)
    ref = reference(z[rows], ids[rows], 0.8, top_r=8)
    for f in FIELDS:
        close(getattr(out, f)[rows], ref[f], 5e-6)
    close(out.top_probs[rows], ref["top"], 5e-6)
    # gradient through a 256-row subset of the big tensor
    zg = z.requires_grad_()
    sub = torch.randperm(n, generator=gen)[:256]
    o = topk_log_softmax(zg, ids, temperature=0.8, rows=sub, entropy=True)
    zz = z.detach()[sub].double().requires_grad_()
    rs = reference(zz, ids[sub], 0.8)
    w = weights_like(rs, gen)
    (g,) = torch.autograd.grad(objective(o, w), zg)
    (g_ref,) = torch.autograd.grad(objective(type(o)(*[rs[f] for f in FIELDS], None), w), zz)
    close(g[sub], g_ref, 5e-6)
    mask = torch.ones(n, dtype=torch.bool)
    mask[sub] = False
    assert torch.count_nonzero(g[mask]) == 0


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_inputs(dtype):
    gen = torch.Generator().manual_seed(3)
    n, vocab, k = 50, 3000, 8
    z = (torch.randn(n, vocab, generator=gen) * 3).to(dtype).requires_grad_()
    ids = rand_ids(n, vocab, k, gen)
    out = topk_log_softmax(z, ids, temperature=0.6, entropy=True, chunk_size=700)
    assert out.lse.dtype == torch.float32
    zz = z.detach().double().requires_grad_()  # the reference sees the same rounded inputs
    ref = reference(zz, ids, 0.6)
    for f in FIELDS:
        close(getattr(out, f), ref[f], 2e-6)  # the statistics are fp32-exact on half inputs
    w = weights_like(ref, gen)
    (g,) = torch.autograd.grad(objective(out, w), z)
    assert g.dtype == dtype
    (g_ref,) = torch.autograd.grad(objective(type(out)(*[ref[f] for f in FIELDS], None), w), zz)
    close(g, g_ref, 1e-2)  # one rounding to the half dtype


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 3e-6), (torch.bfloat16, 2e-2)])
def test_hidden_state_path(dtype, tol):
    gen = torch.Generator().manual_seed(5)
    n, hdim, vocab, k = 70, 24, 1500, 12
    h = (torch.randn(n, hdim, generator=gen)).to(dtype).requires_grad_()
    w_head = (torch.randn(vocab, hdim, generator=gen) * 0.5).to(dtype).requires_grad_()
    ids = rand_ids(n, vocab, k, gen)
    out = topk_log_softmax_from_hidden(h, w_head, ids, temperature=0.9, entropy=True, top_r=4, chunk_size=256, block_elems=3000)
    hh = h.detach().double().requires_grad_()
    ww = w_head.detach().double().requires_grad_()
    ref = reference(hh @ ww.T, ids, 0.9, top_r=4)
    for f in FIELDS:
        close(getattr(out, f), ref[f], tol)
    close(out.top_probs, ref["top"], tol)
    w = weights_like(ref, gen)
    gh, gw = torch.autograd.grad(objective(out, w), (h, w_head))
    assert gh.dtype == dtype and gw.dtype == dtype
    gh_ref, gw_ref = torch.autograd.grad(objective(type(out)(*[ref[f] for f in FIELDS], None), w), (hh, ww))
    close(gh, gh_ref, tol)
    close(gw, gw_ref, tol)


def test_hidden_state_path_rows_and_single_input_grad():
    gen = torch.Generator().manual_seed(6)
    h = torch.randn(20, 8, generator=gen).requires_grad_()
    w_head = torch.randn(90, 8, generator=gen)  # frozen head: only d/dhidden
    ids = rand_ids(20, 90, 4, gen)
    rows = torch.tensor([2, 7, 19])
    out = topk_log_softmax_from_hidden(h, w_head, ids, rows=rows, chunk_size=32)
    hh = h.detach().double().requires_grad_()
    ref = reference(hh[rows] @ w_head.double().T, ids[rows], 1.0)
    close(out.logp, ref["logp"], 2e-6)
    (g,) = torch.autograd.grad(out.logp.sum() + out.log_rest.sum(), h)
    (g_ref,) = torch.autograd.grad(ref["logp"].sum() + ref["log_rest"].sum(), hh)
    close(g, g_ref, 2e-6)
    assert torch.count_nonzero(g[[0, 1, 3]]) == 0


def test_poisoned_buffers_are_fully_overwritten(monkeypatch):
    gen = torch.Generator().manual_seed(9)
    z = (torch.randn(33, 777, generator=gen) * 2).requires_grad_()
    ids = rand_ids(33, 777, 9, gen)
    w = weights_like(reference(z.detach(), ids, 1.0), gen)
    clean = topk_log_softmax(z, ids, entropy=True, top_r=3, chunk_size=100, block_elems=500)
    (g_clean,) = torch.autograd.grad(objective(clean, w), z)
    monkeypatch.setattr(K, "_POISON_ALLOC", True)
    poisoned = topk_log_softmax(z, ids, entropy=True, top_r=3, chunk_size=100, block_elems=500)
    (g_p,) = torch.autograd.grad(objective(poisoned, w), z)
    for a, b in zip(clean, poisoned):
        assert torch.isfinite(b).all()
        assert torch.equal(a, b)
    assert torch.isfinite(g_p).all() and torch.equal(g_clean, g_p)
    # hidden path too (its dW buffer is allocated with the poisoning allocator)
    h = torch.randn(10, 6, generator=gen).requires_grad_()
    w_head = torch.randn(50, 6, generator=gen).requires_grad_()
    o = topk_log_softmax_from_hidden(h, w_head, rand_ids(10, 50, 3, gen), chunk_size=16)
    gh, gw = torch.autograd.grad(o.logp.sum(), (h, w_head))
    assert torch.isfinite(gh).all() and torch.isfinite(gw).all()


def test_unselected_rows_are_never_read():
    gen = torch.Generator().manual_seed(10)
    z = torch.randn(12, 100, generator=gen)
    z[1] = float("nan")
    z[5, 3] = float("inf")
    z.requires_grad_()
    ids = rand_ids(12, 100, 4, gen)
    rows = torch.tensor([0, 2, 3, 11])
    out = topk_log_softmax(z, ids, rows=rows, entropy=True)
    assert all(torch.isfinite(t).all() for t in out[:4])
    (g,) = torch.autograd.grad(out.logp.sum() + out.entropy.sum(), z)
    assert torch.isfinite(g).all()
    keep = torch.zeros(12, dtype=torch.bool)
    keep[rows] = True
    assert torch.count_nonzero(g[~keep]) == 0


def test_rest_mass_by_exclusion_is_accurate():
    """Top-k holding all but ~1e-15 of the mass: 1 - sum(p_topk) would be 0 in fp32."""
    vocab = 1000
    z = torch.zeros(4, vocab)
    z[:, 0] = 40.0
    z[:, 1] = 38.0
    ids = torch.tensor([[0, 1]] * 4)
    out = topk_log_softmax(z, ids, chunk_size=128)
    ref = reference(z, ids, 1.0)
    assert float(ref["log_rest"][0]) < -30
    close(out.log_rest, ref["log_rest"], 1e-6)
    # below the floor: clamped, and no gradient through the clamp
    z2 = torch.full((2, 50), -200.0)
    z2[:, :3] = 0.0
    z2.requires_grad_()
    o2 = topk_log_softmax(z2, torch.tensor([[0, 1, 2]] * 2))
    assert torch.all(o2.log_rest == torch.tensor(LOG_REST_FLOOR, dtype=torch.float32))
    (g,) = torch.autograd.grad(o2.log_rest.sum(), z2)
    assert torch.count_nonzero(g) == 0


def test_duplicate_ids_and_minus_inf_logits():
    gen = torch.Generator().manual_seed(12)
    z = torch.randn(6, 64, generator=gen)
    z[:, 60:] = float("-inf")  # e.g. masked vocabulary padding
    z.requires_grad_()
    ids = rand_ids(6, 60, 4, gen)
    ids[:, 3] = ids[:, 0]  # a duplicate: the rest excludes the set, logp gathers both
    out = topk_log_softmax(z, ids, entropy=True, chunk_size=16)
    zz = z.detach().double().clamp(min=-1e4).requires_grad_()  # exp(-1e4) == 0 in float64 too
    ref = reference(zz, ids, 1.0)
    for f in FIELDS:
        close(getattr(out, f), ref[f], 2e-6)
    w = weights_like(ref, gen)
    (g,) = torch.autograd.grad(objective(out, w), z)
    (g_ref,) = torch.autograd.grad(objective(type(out)(*[ref[f] for f in FIELDS], None), w), zz, retain_graph=True)
    close(g, g_ref, 2e-6)
    assert torch.count_nonzero(g[:, 60:]) == 0
    # without the entropy (other code path for -inf)
    o2 = topk_log_softmax(z, ids, chunk_size=16)
    close(o2.log_rest, ref["log_rest"], 2e-6)
    (g2,) = torch.autograd.grad((o2.logp * w["logp"]).sum() + (o2.log_rest * w["log_rest"]).sum(), z)
    (g2_ref,) = torch.autograd.grad((ref["logp"] * w["logp"]).sum() + (ref["log_rest"] * w["log_rest"]).sum(), zz)
    close(g2, g2_ref, 2e-6)


def test_no_vocab_sized_tensor_saved_for_backward():
    """Saved-tensor hooks: besides the inputs, autograd keeps only [N] / [N, k] tensors."""
    gen = torch.Generator().manual_seed(13)
    n, vocab, k = 256, 8192, 16
    z = (torch.randn(n, vocab, generator=gen)).to(torch.bfloat16).requires_grad_()
    ids = rand_ids(n, vocab, k, gen)
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = topk_log_softmax(z, ids, entropy=True)
        loss = out.logp.sum() + out.log_rest.sum() + out.entropy.sum()
    extra = [t for t in saved if t.data_ptr() != z.data_ptr()]
    extra_bytes = sum(t.numel() * t.element_size() for t in extra)
    assert all(t.numel() <= n * k for t in extra), [tuple(t.shape) for t in extra]
    assert extra_bytes <= n * (12 * k + 32)  # ids (int64) + logp + 4 per-row vectors; logits: 2 * n * vocab
    loss.backward()


def test_argument_validation(monkeypatch):
    z = torch.randn(3, 10)
    with pytest.raises(ValueError, match="ids must lie"):
        topk_log_softmax(z, torch.tensor([[0], [10], [1]]))
    with pytest.raises(ValueError, match="temperature"):
        topk_log_softmax(z, temperature=0.0)
    with pytest.raises(TypeError):
        topk_log_softmax(z, torch.zeros(3, 1))
    with pytest.raises(ValueError, match="leading shape"):
        topk_log_softmax(z, torch.zeros(2, 1, dtype=torch.long))
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="CUDA"):
        topk_log_softmax(z, backend="triton")
    monkeypatch.setenv(K.BACKEND_ENV, "torch")
    assert K._resolve_backend("auto", torch.device("cuda"), hidden=False) == "torch"
    monkeypatch.delenv(K.BACKEND_ENV)
    assert K._resolve_backend("auto", torch.device("cpu"), hidden=False) == "torch"
    out = topk_log_softmax(z)  # k = 0: rest is everything
    assert torch.all(out.log_rest == 0) and out.logp.shape == (3, 0)


_INTERP_SCRIPT = textwrap.dedent(
    """
    import torch
    from dyjr_verl.kernels import topk_log_softmax
    torch.manual_seed(0)
    cases = [(5, 300, 5, torch.float32, None, True, 5), (4, 257, 3, torch.bfloat16, [3, 0], True, 4),
             (3, 70, 0, torch.float32, None, False, 0), (2, 40, 2, torch.float32, None, True, 3),
             # several vocabulary blocks (BLOCK_V = 4096, or 1024 with top-r): ids bucketed per block
             (3, 9000, 16, torch.float32, [2, 0], True, 0), (1, 5000, 32, torch.bfloat16, None, True, 4)]
    for n, v, k, dt, rows, ent, r in cases:
        z = (torch.randn(n, v) * 3).to(dt)
        if v == 40:
            z[:, -5:] = float("-inf")  # masked vocabulary entries
        z.requires_grad_()
        ids = torch.stack([torch.randperm(v - 5)[:k] for _ in range(n)]) if k else None
        if k >= 3:
            ids[0, 2] = ids[0, 0]
        rows_t = torch.tensor(rows) if rows is not None else None
        res = {}
        for be in ("torch", "triton"):
            o = topk_log_softmax(z, ids, temperature=0.7, rows=rows_t, entropy=ent, top_r=r, backend=be)
            terms = [o.lse.sum() * 0.3, o.log_rest.sum() * -1.1]
            if k:
                terms.append((o.logp * torch.linspace(-1, 1, k)).sum())
            if ent:
                terms.append(o.entropy.sum() * 0.7)
            (g,) = torch.autograd.grad(sum(terms), z)
            res[be] = (o, g)
        (a, ga), (b, gb) = res["torch"], res["triton"]
        for name, x, y in zip(a._fields, a, b):
            if x is None:
                assert y is None, name
                continue
            err = float((x - y).abs().max()) if x.numel() else 0.0
            assert err < 1e-5, (name, err)
        tol = 1e-5 if dt == torch.float32 else 2e-2
        gerr = float((ga.float() - gb.float()).abs().max())
        assert gerr <= tol * max(1.0, float(ga.float().abs().max())), ("grad", gerr)
    print("INTERPRETER-OK")
    """
)


def test_triton_kernels_in_cpu_interpreter():
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, "-c", _INTERP_SCRIPT], env=env, capture_output=True, text=True, timeout=300, cwd=REPO)
    assert proc.returncode == 0 and "INTERPRETER-OK" in proc.stdout, proc.stdout[-2000:] + proc.stderr[-4000:]


def test_auto_backend_is_torch_on_cuda_until_a_gpu_check_is_recorded(monkeypatch):
    """The Triton kernel has never been compiled on a GPU: ``auto`` must not pick it there."""
    monkeypatch.delenv(K.BACKEND_ENV, raising=False)
    monkeypatch.setattr(K, "triton_available", lambda: True)
    assert K.TRITON_GPU_VERIFIED is False or (Path(__file__).parents[1] / "benchmarks" / "topk_kernel_gpu.md").exists()
    assert K._resolve_backend("auto", torch.device("cuda"), hidden=False) == "torch"
    monkeypatch.setattr(K, "TRITON_GPU_VERIFIED", True)
    assert K._resolve_backend("auto", torch.device("cuda"), hidden=False) == "triton"


def test_triton_failure_falls_back_to_torch_with_one_warning(monkeypatch):
    import sys
    import types
    import warnings

    broken = types.ModuleType("dyjr_verl.kernels._triton_topk")

    def fail(*args, **kwargs):
        raise RuntimeError("PTX compile failed")

    broken.triton_forward = broken.triton_backward = fail
    monkeypatch.setitem(sys.modules, "dyjr_verl.kernels._triton_topk", broken)
    import dyjr_verl.kernels as kernels_pkg

    monkeypatch.setattr(kernels_pkg, "_triton_topk", broken, raising=False)
    monkeypatch.setattr(K, "_TRITON_FAILED", [])
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # lets backend='triton' through on CPU tensors
    z = torch.randn(5, 40, requires_grad=True)
    ids = torch.randint(0, 40, (5, 3))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = topk_log_softmax(z, ids, backend="triton")
        out2 = topk_log_softmax(z, ids, backend="triton")
    ref = topk_log_softmax(z.detach(), ids, backend="torch")
    assert torch.allclose(out.logp, ref.logp) and torch.allclose(out2.log_rest, ref.log_rest)
    (g,) = torch.autograd.grad(out.logp.sum(), z)
    assert torch.isfinite(g).all() and g.abs().sum() > 0
    msgs = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(msgs) == 1 and "PTX compile failed" in msgs[0] and "torch backend" in msgs[0]
