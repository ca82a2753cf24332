"""DyJR's forward-KL replay term: f(u) = u - 1 - log u, u = pi_theta(y) / pi_stored(y), on replayed
tokens (``dyjr.js.divergence=forward_kl``). Its expectation under the stored policy is
KL(pi_stored || pi_theta), its gradient weight is u - 1, and through the replay-aware engine loss it
adds lambda * mean f over replay tokens and nothing on fresh rows (the harness of
tests/replay/test_loss.py: verl's own ppo_loss and micro-batches built as verl's FSDP engine builds them)."""

from __future__ import annotations

import math

import pytest
import torch
from omegaconf import OmegaConf

import test_loss as trl  # the shared toy policy / verl micro-batch harness (tests/replay/test_loss.py, on sys.path)

from dyjr_verl.methods.dyjr.config import DyJRConfig, JSConfig
from dyjr_verl.replay.config import ConfigError
from dyjr_verl.methods.dyjr.divergence import (
    dyjr_loss_spec,
    f_forward_kl_from_log,
    f_js_from_log,
    forward_kl_grad_weight_from_log,
)
from dyjr_verl.replay.rows import REPLAY_TOKENS_KEY
from dyjr_verl.replay.terms import REPLAY_TERMS, ReplayLossSpec, make_replay_loss_fn


# -- the estimator -------------------------------------------------------------------------------


def test_monte_carlo_mean_under_the_stored_policy_is_forward_kl():
    g = torch.Generator().manual_seed(0)
    log_q = torch.log_softmax(torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, -2.5], dtype=torch.float64), -1)  # stored
    log_p = torch.log_softmax(torch.tensor([0.0, 1.5, -0.5, 1.0, 0.5, 0.0], dtype=torch.float64), -1)  # pi_theta
    kl_qp = float((log_q.exp() * (log_q - log_p)).sum())
    kl_pq = float((log_p.exp() * (log_p - log_q)).sum())
    y = torch.multinomial(log_q.exp(), 400_000, replacement=True, generator=g)  # tokens the stored policy sampled
    log_u = log_p[y] - log_q[y]
    f = f_forward_kl_from_log(log_u)
    se = float(f.std()) / math.sqrt(len(f))
    assert abs(float(f.mean()) - kl_qp) < 4 * se
    assert abs(kl_pq - kl_qp) > 40 * se  # the reverse KL is clearly not what is estimated
    assert abs(float(torch.expm1(log_u).mean())) < 4 * float(torch.expm1(log_u).std()) / math.sqrt(len(f))  # E_Q[u-1]=0


def test_exact_expectation_and_its_gradient_are_those_of_kl():
    """sum_y Q(y) f(u(y)) equals KL(Q||P_theta) exactly (sum_y Q (u - 1) = 0), so its gradient with
    respect to the logits of P_theta is P - Q, the gradient of the forward KL."""
    log_q = torch.log_softmax(torch.tensor([1.0, -0.5, 0.3, 2.0], dtype=torch.float64), -1)
    logits = torch.tensor([0.2, 0.9, -1.0, 0.4], dtype=torch.float64, requires_grad=True)
    log_p = torch.log_softmax(logits, -1)
    expected = (log_q.exp() * f_forward_kl_from_log(log_p - log_q)).sum()
    assert torch.allclose(expected, (log_q.exp() * (log_q - log_p)).sum(), atol=1e-14)
    expected.backward()
    assert torch.allclose(logits.grad, log_p.exp().detach() - log_q.exp(), atol=1e-14)


def test_gradient_weight_with_respect_to_log_pi_theta_is_u_minus_one():
    stored = torch.tensor([-0.3, -2.0, -5.0, -0.01, -1.2], dtype=torch.float64)
    log_prob = torch.tensor([-1.1, -0.4, -5.0, -9.0, -0.2], dtype=torch.float64, requires_grad=True)
    f_forward_kl_from_log(log_prob - stored).sum().backward()
    u = torch.exp(log_prob.detach() - stored)
    assert torch.allclose(log_prob.grad, u - 1, atol=1e-14)
    assert torch.allclose(forward_kl_grad_weight_from_log(log_prob.detach() - stored), u - 1, atol=1e-14)
    # weight -1 for an abandoned token (u -> 0): the pull does not fade, unlike JS's
    assert float(forward_kl_grad_weight_from_log(torch.tensor(-15.0))) == pytest.approx(-1.0, abs=1e-6)


def test_values_exact_near_one_nonnegative_finite_at_the_clamp_and_bf16_upcast():
    lu = torch.tensor([-1e-4, 0.0, 1e-4], dtype=torch.float32)
    f = f_forward_kl_from_log(lu)
    assert float(f[1]) == 0.0
    assert torch.allclose(f.double(), lu.double() ** 2 / 2 + lu.double() ** 3 / 6, rtol=1e-3)  # series; no cancellation
    grid = torch.linspace(-30, 30, 601)
    vals = f_forward_kl_from_log(grid, clamp=20.0)
    assert (vals >= 0).all() and torch.isfinite(vals).all()
    assert float(vals[0]) == pytest.approx(math.expm1(-20) + 20, rel=1e-6)
    x = torch.tensor([0.5, -0.75], dtype=torch.bfloat16)
    assert f_forward_kl_from_log(x).dtype == torch.float32
    # twice JS's curvature at u = 1: the same lambda is about twice as strong for small drift
    small = torch.tensor([1e-2], dtype=torch.float64)
    assert float(f_forward_kl_from_log(small) / f_js_from_log(small)) == pytest.approx(2.0, rel=1e-2)


# -- through the replay-aware engine loss --------------------------------------------------------


def forward_kl_reference(model, td, coef, loss_agg_mode="token-mean", log_u_clamp=20.0):
    """coef * mean over replay tokens of u - 1 - log u, by hand (value, flat gradient)."""
    log_u, mask = trl.replay_log_u(model, td, log_u_clamp)
    u = log_u.exp()
    f = (u - 1 - log_u) * mask
    val = f.sum() / mask.sum() if loss_agg_mode == "token-mean" else (f.sum(-1) / mask.sum(-1)).mean()
    (coef * val).backward()
    weight = float(((u - 1) * mask).sum() / mask.sum())
    return float(val), weight, torch.cat([p.grad.reshape(-1).clone() for p in model.parameters()])


@pytest.mark.parametrize("loss_agg_mode", ["token-mean", "seq-mean-token-mean"])
def test_engine_loss_adds_lambda_mean_f_on_replay_tokens(loss_agg_mode):
    model = trl.TinyPolicy()
    cfg = trl.actor_config(loss_agg_mode)
    fn = make_replay_loss_fn(cfg, ReplayLossSpec(kind="forward_kl", coef=0.3))
    td = trl.add_normalizers(trl.make_batch(), mini_batch_size=8)
    g1, metrics, _ = trl.engine_grads(model, fn, td, micro=1)
    g4, metrics4, _ = trl.engine_grads(model, fn, td, micro=4, perm=torch.tensor([4, 0, 7, 1, 3, 6, 2, 5]))
    assert trl.close(g1, g4)  # micro-batch split and row order do not matter
    value, weight, g_replay = forward_kl_reference(model, td, 0.3, loss_agg_mode)
    assert trl.close(g1, trl.fresh_reference_grad(model, cfg, td) + g_replay)
    # the logged term and loss are the mean f and lambda * mean f; weight_mean is mean(u - 1)
    m = metrics[0]
    assert m["replay/term"].values[0] == pytest.approx(value, rel=1e-9)
    assert m["replay/loss"].values[0] == pytest.approx(0.3 * value, rel=1e-9)
    assert m["replay/coef"] == 0.3
    total_weight = sum(float(x["replay/weight_mean"].values[0]) for x in metrics4)
    assert total_weight == pytest.approx(weight, rel=1e-6)
    # and it is not the JS term
    g_js, _, _ = trl.engine_grads(model, make_replay_loss_fn(cfg, ReplayLossSpec(kind="js", coef=0.3)), td, micro=1)
    assert not trl.close(g1, g_js)


def test_nothing_on_fresh_rows():
    model = trl.TinyPolicy()
    cfg = trl.actor_config()
    fn = make_replay_loss_fn(cfg, ReplayLossSpec(kind="forward_kl", coef=0.5))
    # an all-fresh batch: exactly verl's ppo_loss, and a zero replay term
    fresh = trl.add_normalizers(trl.make_batch(replay_rows=()), mini_batch_size=8)
    g, metrics, _ = trl.engine_grads(model, fn, fresh, micro=2)
    ref_fn = lambda model_output, data, dp_group=None: trl.ppo_loss(cfg, model_output, data, dp_group)  # noqa: E731
    g_ref, _, _ = trl.engine_grads(model, ref_fn, fresh, micro=2)
    assert torch.equal(g, g_ref)
    assert all(float(m["replay/term"].values[0]) == 0.0 and float(m["replay/rows"].values[0]) == 0 for m in metrics)
    # stored log-probs of fresh rows are never read; those of replay rows are
    td = trl.add_normalizers(trl.make_batch(), mini_batch_size=8)
    base, _, _ = trl.engine_grads(model, fn, td, micro=2)
    for row, changes in [(0, False), (1, True)]:  # row 0 fresh, row 1 replay
        other = td.clone()
        stored = list(other["stored_log_probs"].unbind())
        stored[row] = stored[row] - 0.7
        other["stored_log_probs"] = torch.nested.as_nested_tensor(stored, layout=torch.jagged)
        g_other, _, _ = trl.engine_grads(model, fn, other, micro=2)
        assert trl.close(g_other, base) is not changes


def test_extreme_drift_stays_finite_in_bf16():
    model = trl.TinyPolicy()
    cfg = trl.actor_config(kl=True, entropy_coeff=0.01)
    fn = make_replay_loss_fn(cfg, ReplayLossSpec(kind="forward_kl"))
    td = trl.add_normalizers(trl.make_batch(replay_rows=(0, 1, 2, 3), extreme=True), mini_batch_size=8)
    g, metrics, losses = trl.engine_grads(model, fn, td, micro=2, entropy=True, lp_dtype=torch.bfloat16)
    assert torch.isfinite(g).all() and all(math.isfinite(x) for x in losses)
    assert float(td[REPLAY_TOKENS_KEY][0]) > 0 and sum(float(m["replay/rows"].values[0]) for m in metrics) == 4


# -- the setting ---------------------------------------------------------------------------------


def test_divergence_setting_picks_the_term():
    assert "forward_kl" in REPLAY_TERMS and ReplayLossSpec(kind="forward_kl").resolved_coef == 0.1
    default = dyjr_loss_spec(DyJRConfig.from_dict({}))
    assert DyJRConfig().js.divergence == "js" and default.kind == "js"
    cfg = DyJRConfig.from_omegaconf(OmegaConf.create({"js": {"divergence": "forward_kl", "coef": 0.05}}))
    spec = dyjr_loss_spec(cfg)
    assert spec.kind == "forward_kl" and spec.resolved_coef == 0.05 and spec.resolved_normalizer == "separate"
    assert dyjr_loss_spec(cfg.js).kind == "forward_kl"  # the js node alone works too
    topk = dyjr_loss_spec(DyJRConfig.from_dict({"js": {"divergence": "js", "estimator": "topk"}}))
    assert topk.kind == "topk_js"


def test_bad_divergence_is_one_clear_error_line():
    with pytest.raises(ConfigError) as info:
        DyJRConfig.from_dict({"js": {"divergence": "forward-kl"}})
    assert info.value.errors == ["dyjr.js.divergence must be one of 'js', 'forward_kl', got 'forward-kl' "
                                 "(did you mean 'forward_kl'?)"]


def test_forward_kl_with_the_topk_estimator_is_refused_in_one_line():
    with pytest.raises(ConfigError) as info:
        DyJRConfig.from_dict({"js": {"divergence": "forward_kl", "estimator": "topk"}})
    assert len(info.value.errors) == 1
    assert info.value.errors[0].startswith("dyjr.js.divergence forward_kl has no top-k estimator")
    assert "dyjr.js.estimator=sampled" in info.value.errors[0]
    # the same line reaches the start-up check (preflight) of main_ppo
    from dyjr_verl.preflight import _check_method_node

    node = OmegaConf.create({"js": {"divergence": "forward_kl", "estimator": "topk"}})
    assert _check_method_node(node) == info.value.errors
    # nodes built in code skip parsing: validate() and the spec refuse as well
    with pytest.raises(ConfigError):
        JSConfig(divergence="forward_kl", estimator="topk").validate()
    with pytest.raises(ValueError, match="JS only"):
        dyjr_loss_spec(JSConfig(divergence="forward_kl", estimator="topk"))
