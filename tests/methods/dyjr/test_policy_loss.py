"""The registered ``dyjr_js`` policy loss (verl's registry): registration, value, gradient, verl's ppo_loss."""

from __future__ import annotations

import math

import pytest
import torch

from dyjr_verl.methods.dyjr.divergence import f_js_from_log, js_term
from dyjr_verl.methods.dyjr.policy_loss import (
    DYJR_JS_LOSS_NAME,
    JS_COEF_ENV,
    compute_policy_loss_dyjr_js,
    register_policy_losses,
)


def _actor_config(loss_mode="vanilla"):
    from verl.workers.config import ActorConfig, PolicyLossConfig

    return ActorConfig(
        strategy="fsdp", rollout_n=2, ppo_micro_batch_size_per_gpu=1, policy_loss=PolicyLossConfig(loss_mode=loss_mode)
    )


def _inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    old = -torch.rand(3, 6, generator=g) * 2
    lp = (old + torch.randn(3, 6, generator=g) * 0.4).requires_grad_(True)
    adv = torch.randn(3, 1, generator=g).expand(3, 6).contiguous()
    mask = torch.ones(3, 6, dtype=torch.bool)
    mask[1, 4:] = False
    return old, lp, adv, mask


def test_registry_loss_registered_and_idempotent():
    from verl.trainer.ppo.core_algos import POLICY_LOSS_REGISTRY, get_policy_loss_fn

    assert register_policy_losses() == [DYJR_JS_LOSS_NAME]
    before = dict(POLICY_LOSS_REGISTRY)
    register_policy_losses()
    assert dict(POLICY_LOSS_REGISTRY) == before
    assert get_policy_loss_fn(DYJR_JS_LOSS_NAME) is compute_policy_loss_dyjr_js


def test_registry_loss_is_vanilla_plus_lambda_js(monkeypatch):
    from verl.trainer.ppo.core_algos import agg_loss, compute_policy_loss_vanilla

    cfg = _actor_config(DYJR_JS_LOSS_NAME)
    cfg.global_batch_info.update(dp_size=1, batch_num_tokens=40, global_batch_size=3, loss_scale_factor=None)
    old, lp, adv, mask = _inputs()
    kw = dict(old_log_prob=old, log_prob=lp, advantages=adv, response_mask=mask, loss_agg_mode="token-mean", config=cfg)
    monkeypatch.setenv(JS_COEF_ENV, "0")
    zero, _ = compute_policy_loss_dyjr_js(**kw, rollout_is_weights=None)
    van, _ = compute_policy_loss_vanilla(**kw, rollout_is_weights=None)
    assert torch.equal(zero, van)
    monkeypatch.setenv(JS_COEF_ENV, "0.25")
    loss, metrics = compute_policy_loss_dyjr_js(**kw, rollout_is_weights=None, extra_kwarg=1)
    term, _ = js_term(lp, old, mask)
    expected = van + 0.25 * agg_loss(term, mask, "token-mean", **cfg.global_batch_info)
    assert torch.allclose(loss, expected)
    assert metrics["actor/js_coef"] == 0.25 and "actor/js_u_mean" in metrics and "actor/pg_clipfrac" in metrics
    monkeypatch.delenv(JS_COEF_ENV)
    _, m = compute_policy_loss_dyjr_js(**kw)
    assert m["actor/js_coef"] == 0.1
    for bad in ("-1", "abc", "nan"):
        monkeypatch.setenv(JS_COEF_ENV, bad)
        with pytest.raises(ValueError, match=JS_COEF_ENV):
            compute_policy_loss_dyjr_js(**kw)


def test_registry_loss_through_verl_ppo_loss(monkeypatch):
    """Selected by loss_mode=dyjr_js, run by verl's own engine loss on a jagged micro-batch."""
    from verl.utils import tensordict_utils as tu
    from verl.workers.utils.losses import ppo_loss

    monkeypatch.setenv(JS_COEF_ENV, "0.5")
    lens_p, lens_r = [2, 3], [4, 2]
    jag = lambda rows: torch.nested.as_nested_tensor(rows, layout=torch.jagged)  # noqa: E731
    data = tu.get_tensordict(
        {
            "prompts": jag([torch.zeros(n, dtype=torch.long) for n in lens_p]),
            "responses": jag([torch.zeros(n, dtype=torch.long) for n in lens_r]),
            "response_mask": jag([torch.ones(n, dtype=torch.long) for n in lens_r]),
            "old_log_probs": jag([torch.full((n,), -1.0) for n in lens_r]),
            "advantages": jag([torch.full((n,), 0.5) for n in lens_r]),
        },
        {"dp_size": 1, "batch_num_tokens": 6, "global_batch_size": 2},
    )
    values = torch.full((sum(lens_p) + sum(lens_r),), -0.7, requires_grad=True)
    offsets = torch.tensor([0, 6, 11])
    out = {"log_probs": torch.nested.nested_tensor_from_jagged(values, offsets)}
    loss, metrics = ppo_loss(_actor_config(DYJR_JS_LOSS_NAME), out, data)
    loss.backward()
    assert torch.isfinite(loss) and values.grad is not None
    # u = e^0.3 everywhere: JS part = 0.5 * f_JS(e^0.3); the PG part is clipped at 1 + 0.2
    f = float(f_js_from_log(torch.tensor(0.3)))
    assert math.isclose(float(loss.detach()), -0.5 * 1.2 + 0.5 * f, rel_tol=1e-5)


def test_registry_loss_looked_up_by_name_gives_the_documented_value(monkeypatch):
    """What a user's own trainer gets with actor.policy_loss.loss_mode=dyjr_js: verl looks the loss
    up by name; on real tensors it is vanilla PG + lambda * token-mean f_JS (lambda from DYJR_JS_COEF)."""
    from verl.trainer.ppo.core_algos import get_policy_loss_fn

    monkeypatch.setenv(JS_COEF_ENV, "0.3")
    cfg = _actor_config(DYJR_JS_LOSS_NAME)
    cfg.global_batch_info.update(dp_size=1, batch_num_tokens=4, global_batch_size=2, loss_scale_factor=None)
    old = torch.tensor([[-1.0, -1.0], [-2.0, -2.0]])
    lp = torch.tensor([[-1.0, -0.9], [-2.0, -2.0]], requires_grad=True)  # one token moved: log u = 0.1
    adv = torch.zeros(2, 2)  # no policy gradient: the loss is the JS part alone
    mask = torch.ones(2, 2, dtype=torch.bool)
    loss, metrics = get_policy_loss_fn("dyjr_js")(old, lp, adv, mask, "token-mean", cfg)
    expected = 0.3 * float(f_js_from_log(torch.tensor(0.1))) / 4  # token mean over 4 tokens
    assert math.isclose(float(loss.detach()), expected, rel_tol=1e-5) and expected > 0
    loss.backward()
    assert lp.grad[0, 1] > 0 and lp.grad[0, 0] == 0  # only the moved token is pulled back
    assert metrics["actor/js_coef"] == 0.3


def test_registry_loss_caps_one_tokens_weight_like_the_replay_term(monkeypatch):
    """A token whose probability rose far above the sampler's (log u = 8) pulls with the capped weight
    (DYJR_JS_MAX_WEIGHT, default 4 = dyjr.js.max_weight), not f_JS's ~2e3; 'none' removes the cap."""
    from dyjr_verl.methods.dyjr.config import DEFAULT_MAX_WEIGHT
    from dyjr_verl.methods.dyjr.divergence import js_grad_weight_from_log
    from dyjr_verl.methods.dyjr.policy_loss import JS_MAX_WEIGHT_ENV

    monkeypatch.setenv(JS_COEF_ENV, "1")
    cfg = _actor_config(DYJR_JS_LOSS_NAME)
    cfg.global_batch_info.update(dp_size=1, batch_num_tokens=2, global_batch_size=1, loss_scale_factor=None)
    old = torch.tensor([[-10.0, -1.0]])
    adv = torch.zeros(1, 2)
    mask = torch.ones(1, 2, dtype=torch.bool)

    def grad_and_metrics():
        lp = torch.tensor([[-2.0, -1.0]], requires_grad=True)  # token 0: log u = 8
        loss, metrics = compute_policy_loss_dyjr_js(old, lp, adv, mask, "token-mean", cfg)
        loss.backward()
        return lp.grad[0, 0].item(), metrics

    g, m = grad_and_metrics()  # default cap
    assert math.isclose(g, DEFAULT_MAX_WEIGHT / 2, rel_tol=1e-4)  # weight 4, token mean over 2 tokens
    assert m["actor/js_capped_frac"] == 0.5 and math.isclose(m["actor/js_u_max"], math.exp(8), rel_tol=1e-4)
    monkeypatch.setenv(JS_MAX_WEIGHT_ENV, "none")
    g, m = grad_and_metrics()
    assert math.isclose(g, float(js_grad_weight_from_log(torch.tensor(8.0))) / 2, rel_tol=1e-4) and g > 500
    assert "actor/js_capped_frac" not in m
    monkeypatch.setenv(JS_MAX_WEIGHT_ENV, "10")
    assert math.isclose(grad_and_metrics()[0], 5.0, rel_tol=1e-4)
    for bad in ("0", "-2", "inf", "x"):
        monkeypatch.setenv(JS_MAX_WEIGHT_ENV, bad)
        with pytest.raises(ValueError, match=JS_MAX_WEIGHT_ENV):
            compute_policy_loss_dyjr_js(old, old.clone(), adv, mask, "token-mean", cfg)


def test_a_bad_lambda_or_cap_for_the_registry_loss_is_refused_at_start_up_in_one_line(tmp_path, monkeypatch):
    """The loss reads its env vars on the first update inside a Ray actor; `plan` and main_ppo's
    start-up check read the same values (Ray's runtime env over the driver's) before any rollout."""
    from dyjr_verl.methods.dyjr.policy_loss import JS_MAX_WEIGHT_ENV
    from dyjr_verl.plan import build_plan, compose

    monkeypatch.delenv(JS_COEF_ENV, raising=False)
    monkeypatch.delenv(JS_MAX_WEIGHT_ENV, raising=False)
    for name in ("train.parquet", "test.parquet"):
        (tmp_path / name).write_bytes(b"")
    base = [f"data.train_files={tmp_path / 'train.parquet'}", f"data.val_files={tmp_path / 'test.parquet'}",
            "actor_rollout_ref.actor.policy_loss.loss_mode=dyjr_js"]
    env = "+ray_kwargs.ray_init.runtime_env.env_vars."

    def ours(*overrides):
        return [e for e in build_plan(compose("grpo_math", [*base, *overrides])).errors if "dyjr_js" in e]

    assert ours() == [] and ours(f"{env}{JS_COEF_ENV}='0.2'", f"{env}{JS_MAX_WEIGHT_ENV}=none") == []
    assert ours(f"{env}{JS_COEF_ENV}='-1'") == [
        f"the dyjr_js policy loss: {JS_COEF_ENV} must be a finite number >= 0, got '-1'"]
    monkeypatch.setenv(JS_MAX_WEIGHT_ENV, "0")  # the driver's environment counts where Ray's does not say
    assert len(ours()) == 1 and JS_MAX_WEIGHT_ENV in ours()[0]
    assert ours(f"{env}{JS_MAX_WEIGHT_ENV}=8") == []  # Ray's runtime env wins over the driver's
