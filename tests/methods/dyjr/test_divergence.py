"""The sampled-token JS generator: expectation identity, gradient weight, numerics."""

from __future__ import annotations

import math

import pytest
import torch

from dyjr_verl.methods.dyjr.divergence import (
    LOG2,
    f_js,
    f_js_from_log,
    js_grad_weight,
    js_grad_weight_from_log,
    js_term,
)


def jsd(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Exact JSD(P, Q) = 1/2 KL(P||M) + 1/2 KL(Q||M) (0 log 0 = 0)."""
    m = 0.5 * (p + q)

    def kl(a, b):
        return torch.where(a > 0, a * (a.log() - b.log()), torch.zeros_like(a)).sum(-1)

    return 0.5 * kl(p, m) + 0.5 * kl(q, m)


def random_categorical(k: int, g: torch.Generator, zeros: int = 0) -> torch.Tensor:
    logits = torch.randn(k, generator=g, dtype=torch.float64) * 1.5
    p = logits.softmax(-1)
    if zeros:
        p[:zeros] = 0.0
        p = p / p.sum()
    return p


# -- expectation identity --------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(5))
def test_expectation_by_enumeration_is_twice_jsd(seed):
    g = torch.Generator().manual_seed(seed)
    p = random_categorical(6, g, zeros=seed % 2)  # P may put zero mass where Q samples (u = 0)
    q = random_categorical(6, g)
    expectation = (q * f_js(p / q)).sum()
    assert torch.allclose(expectation, 2 * jsd(p, q), rtol=1e-12, atol=1e-14)
    assert 0 <= float(expectation) <= 2 * LOG2 + 1e-12


def test_monte_carlo_estimate_is_twice_jsd():
    g = torch.Generator().manual_seed(123)
    p, q = random_categorical(5, g), random_categorical(5, g)
    n = 200_000
    y = torch.multinomial(q, n, replacement=True, generator=g)
    samples = f_js_from_log(p.log()[y] - q.log()[y])  # the loss sees log-probs only
    est, se = samples.mean(), samples.std() / math.sqrt(n)
    assert abs(float(est - 2 * jsd(p, q))) < 4 * float(se)


def test_identical_policies_give_zero():
    q = torch.tensor([0.1, 0.2, 0.7], dtype=torch.float64)
    assert float((q * f_js(q / q)).sum()) == 0.0


# -- shape of f and of the gradient weight ---------------------------------------------------


def test_f_values_and_convexity():
    u = torch.logspace(-8, 8, 4001, dtype=torch.float64)
    f = f_js(u)
    assert (f >= 0).all()
    assert float(f_js(torch.tensor(1.0, dtype=torch.float64))) == 0.0
    assert math.isclose(float(f_js(torch.tensor(0.0, dtype=torch.float64))), LOG2, rel_tol=1e-15)
    naive = u * u.log() - (u + 1) * ((u + 1) / 2).log()
    mid = (u > 1e-3) & (u < 1e3)
    assert torch.allclose(f[mid], naive[mid], rtol=1e-10, atol=1e-12)
    # convex: second differences on a linear grid are non-negative
    lin = torch.linspace(0, 10, 2001, dtype=torch.float64)
    fl = f_js(lin)
    assert (fl[2:] - 2 * fl[1:-1] + fl[:-2] >= -1e-12).all()


def test_grad_weight_sign_saturation_and_growth():
    u = torch.linspace(1e-9, 1 - 1e-9, 200_001, dtype=torch.float64)
    w = js_grad_weight(u)
    assert (w < 0).all()
    i = int(w.argmin())
    assert abs(float(u[i]) - 0.30) < 0.01
    assert -0.2325 <= float(w.min()) <= -0.2315
    assert float(js_grad_weight(torch.tensor(1.0, dtype=torch.float64))) == 0.0
    small = js_grad_weight(torch.tensor([1e-6, 1e-12, 0.0], dtype=torch.float64))
    assert (small.abs() < 2e-5).all() and float(small[-1]) == 0.0  # fades as u -> 0
    big = torch.logspace(0.001, 6, 500, dtype=torch.float64)
    wb = js_grad_weight(big)
    assert (wb > 0).all()
    assert (wb.diff() > 0).all()  # grows without bound
    assert math.isclose(float(js_grad_weight(torch.tensor(1e6, dtype=torch.float64))) / 1e6, LOG2, rel_tol=1e-5)


def test_autograd_gradient_is_w_times_grad_log_prob():
    log_u = torch.linspace(-15, 15, 301, dtype=torch.float64, requires_grad=True)
    f_js_from_log(log_u).sum().backward()
    assert torch.allclose(log_u.grad, js_grad_weight_from_log(log_u.detach()), rtol=1e-10, atol=1e-14)
    # through js_term: d f / d log_prob = w(u); the stored side gets no gradient
    lp = torch.tensor([[-1.0, -2.0, -0.1]], dtype=torch.float64, requires_grad=True)
    st = torch.tensor([[-1.5, -0.5, -0.1]], dtype=torch.float64, requires_grad=True)
    term, lu = js_term(lp, st, torch.ones_like(lp, dtype=torch.bool))
    term.sum().backward()
    assert torch.allclose(lp.grad, js_grad_weight_from_log(lu.detach()))
    assert st.grad is None
    assert float(lp.grad[0, 0]) > 0 and float(lp.grad[0, 1]) < 0 and float(lp.grad[0, 2]) == 0
    # minimising raises under-weighted tokens (u < 1: gradient of the loss w.r.t. log pi < 0)


# -- numerics --------------------------------------------------------------------------------


def test_extreme_log_ratios_are_finite():
    lu = torch.tensor([-1e30, -1e4, -100.0, -20.0, 0.0, 20.0, 100.0, 1e4, float("inf"), -float("inf")])
    lu.requires_grad_(True)
    f = f_js_from_log(lu, clamp=20.0)
    f.sum().backward()
    f = f.detach()
    assert torch.isfinite(f).all() and torch.isfinite(lu.grad).all()
    assert math.isclose(float(f[0]), LOG2, rel_tol=1e-6)
    assert math.isclose(float(f[5]), math.exp(20) * LOG2, rel_tol=1e-5)  # ~ e^20 log 2
    # unclamped: u -> 0 stays finite (log 2); u -> inf is honestly inf
    g = f_js_from_log(torch.tensor([-float("inf"), -1e30, 1e3]))
    assert math.isclose(float(g[0]), LOG2, rel_tol=1e-6) and math.isclose(float(g[1]), LOG2, rel_tol=1e-6)
    assert math.isinf(float(g[2]))


def test_js_term_masks_padding_garbage():
    lp = torch.tensor([[-0.5, float("nan"), -float("inf")], [-1.0, -2.0, 0.0]], requires_grad=True)
    st = torch.tensor([[-0.7, 0.0, 0.0], [float("-inf"), -1.0, float("nan")]])
    mask = torch.tensor([[1, 0, 0], [1, 1, 0]])
    term, lu = js_term(lp, st, mask)
    term.sum().backward()
    assert torch.isfinite(term).all() and torch.isfinite(lp.grad).all()
    assert term[0, 1] == 0 and term[0, 2] == 0 and term[1, 2] == 0
    assert float(lu.detach()[1, 0]) == 20.0  # stored -inf -> clamped
    assert lp.grad[0, 1] == 0 and lp.grad[0, 2] == 0


def test_bf16_inputs_computed_in_fp32():
    g = torch.Generator().manual_seed(0)
    lp32 = -torch.rand(4, 9, generator=g) * 3
    st32 = -torch.rand(4, 9, generator=g) * 3
    lp16 = lp32.to(torch.bfloat16).requires_grad_(True)
    st16 = st32.to(torch.bfloat16)
    term, _ = js_term(lp16, st16)
    assert term.dtype == torch.float32
    ref, _ = js_term(lp16.detach().float(), st16.float())
    assert torch.equal(term.detach(), ref)  # same numbers as upcasting by hand
    term.sum().backward()
    assert lp16.grad.dtype == torch.bfloat16 and torch.isfinite(lp16.grad.float()).all()
    assert torch.allclose(term.detach(), js_term(lp32, st32)[0], atol=0.05)


# -- the dyjr_js registry loss ---------------------------------------------------------------
