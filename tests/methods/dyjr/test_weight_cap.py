"""``dyjr.js.max_weight``: one replayed token's gradient weight is bounded on the u > 1 side, for the
JS and the forward-KL term, and the replay loss logs ``replay/u_max`` and ``replay/u_above_10``.

The mini-batch: 8 fresh rows and 1 replayed row of 100 response tokens each (the default share of
1/8), verl's ppo_loss on the fresh rows (advantage 1, ratio 1), one replayed token at log u = 10
among 99 ordinary ones (|log u| <= 0.6); gradients are taken with respect to the log-probs the engine
hands the loss, d loss / d log pi_theta of each token."""

from __future__ import annotations

import math
import pickle

import pytest
import torch
from verl.utils import tensordict_utils as tu
from verl.utils.metric import AggregationType
from verl.workers.config import ActorConfig, PolicyLossConfig
from verl.workers.utils.padding import no_padding_2_padding

from dyjr_verl.methods.dyjr.config import DEFAULT_MAX_WEIGHT, DyJRConfig
from dyjr_verl.methods.dyjr.divergence import (
    DivergenceSpec,
    capped_term,
    dyjr_loss_spec,
    f_forward_kl_from_log,
    f_js_from_log,
    forward_kl_grad_weight_from_log,
    js_grad_weight_from_log,
    weight_knee,
)
from dyjr_verl.replay.config import ConfigError
from dyjr_verl.replay.loss import replay_aware_loss
from dyjr_verl.replay.rows import minibatch_normalizer_fields
from dyjr_verl.replay.terms import make_replay_loss_fn

FRESH_ROWS, TOKENS, PROMPT = 8, 100, 3
EXTREME_LOG_U, EXTREME_AT = 10.0, 37  # the replayed row's token 37
PLAIN = {"js": (f_js_from_log, js_grad_weight_from_log),
         "forward_kl": (f_forward_kl_from_log, forward_kl_grad_weight_from_log)}


def _actor() -> ActorConfig:
    return ActorConfig(strategy="fsdp", rollout_n=2, ppo_micro_batch_size_per_gpu=1,
                       policy_loss=PolicyLossConfig(loss_mode="vanilla"), loss_agg_mode="token-mean")


def _minibatch():
    """(micro-batch = mini-batch TensorDict, flat full-sequence log-probs, their offsets); the last
    row is the replayed one, its stored log-probs set so that log u is ordinary except one token."""
    g = torch.Generator().manual_seed(0)
    n = FRESH_ROWS + 1
    seq = PROMPT + TOKENS
    offsets = torch.arange(n + 1) * seq
    flat = -torch.rand(n * seq, generator=g, dtype=torch.float64) * 3 - 0.05
    ids = [torch.randint(0, 7, (seq,), generator=g) for _ in range(n)]
    jag = lambda rows: torch.nested.as_nested_tensor(list(rows), layout=torch.jagged)  # noqa: E731
    mask = [torch.ones(TOKENS, dtype=torch.int64) for _ in range(n)]
    td = tu.get_tensordict({
        "prompts": jag(i[:PROMPT] for i in ids), "responses": jag(i[PROMPT:] for i in ids), "input_ids": jag(ids),
        "response_mask": jag(mask), "loss_mask": jag(mask),
        "advantages": jag(torch.ones(TOKENS, dtype=torch.float64) for _ in range(n)),
        "replay_mask": torch.tensor([0.0] * FRESH_ROWS + [1.0]),
    })
    response_lp = no_padding_2_padding(torch.nested.nested_tensor_from_jagged(flat, offsets), td)  # (n, TOKENS)
    td["old_log_probs"] = jag(response_lp)  # ratio 1 on the fresh rows
    log_u = (torch.rand(n, TOKENS, generator=g, dtype=torch.float64) - 0.5) * 1.2
    log_u[-1, EXTREME_AT] = EXTREME_LOG_U
    td["stored_log_probs"] = jag(response_lp - log_u)
    for k, v in minibatch_normalizer_fields(td["replay_mask"] > 0.5, torch.full((n,), TOKENS), mini_batch_size=n).items():
        td[k] = v
    tu.assign_non_tensor(td, dp_size=1, batch_num_tokens=n * TOKENS, global_batch_size=n)
    return td, flat, offsets, log_u


def _token_grads(spec):
    """(d loss / d log pi_theta per response token (rows, TOKENS), metrics, log u)."""
    td, flat, offsets, log_u = _minibatch()
    leaf = flat.clone().requires_grad_()
    loss, metrics = make_replay_loss_fn(_actor(), spec)(
        model_output={"log_probs": torch.nested.nested_tensor_from_jagged(leaf, offsets)}, data=td, dp_group=None)
    loss.backward()
    grads = no_padding_2_padding(torch.nested.nested_tensor_from_jagged(leaf.grad, offsets), td)
    return grads, metrics, log_u


@pytest.mark.parametrize("divergence", ["js", "forward_kl"])
def test_a_single_extreme_token_is_bounded_by_the_setting(divergence):
    cfg = DyJRConfig.from_dict({"js": {"divergence": divergence}})
    coef, cap = cfg.js.coef, cfg.js.max_weight
    assert cap == DEFAULT_MAX_WEIGHT == 4.0
    capped, _, log_u = _token_grads(dyjr_loss_spec(cfg))
    uncapped, _, _ = _token_grads(dyjr_loss_spec(cfg, max_weight=None))
    pg_token = capped[0, 0].abs()  # a fresh token: advantage 1, ratio 1
    assert float(pg_token) == pytest.approx(1 / (FRESH_ROWS * TOKENS), rel=1e-12)

    # the extreme token's weight is exactly the cap: coef x max_weight / replay tokens ...
    extreme = float(capped[-1, EXTREME_AT])
    assert extreme == pytest.approx(coef * cap / TOKENS, rel=1e-9)
    # ... i.e. coef x cap x fresh/replay tokens = 3.2 unit PG tokens (the docstring's "~3"), where
    # uncapped it is w(e^10) x 0.8: ~1.2e4 (JS) or ~1.8e4 (forward KL) PG tokens
    assert extreme / float(pg_token) == pytest.approx(coef * cap * FRESH_ROWS, rel=1e-9)
    weight = PLAIN[divergence][1](torch.tensor(EXTREME_LOG_U, dtype=torch.float64))
    assert float(uncapped[-1, EXTREME_AT]) == pytest.approx(coef * float(weight) / TOKENS, rel=1e-9)
    assert float(uncapped[-1, EXTREME_AT]) / float(pg_token) > 1e4

    # every other token is untouched by the cap (all below the knee)
    others = torch.ones_like(capped, dtype=torch.bool)
    others[-1, EXTREME_AT] = False
    assert float(log_u[others].max()) < weight_knee(divergence, cap)

    # its share of the whole update's token gradients: bounded by the cap, not ~all of it uncapped
    share = lambda g: float(g[-1, EXTREME_AT].abs() / g.abs().sum())  # noqa: E731
    bound = (coef * cap / TOKENS) / float(capped[others].abs().sum() + coef * cap / TOKENS)
    assert share(capped) == pytest.approx(bound, rel=1e-9) and share(capped) < 0.01
    assert share(uncapped) > 0.9
    assert torch.allclose(capped[others], uncapped[others], rtol=1e-12, atol=0)


@pytest.mark.parametrize("divergence", ["js", "forward_kl"])
def test_u_max_and_the_share_above_10_are_logged(divergence):
    _, metrics, log_u = _token_grads(dyjr_loss_spec(DyJRConfig.from_dict({"js": {"divergence": divergence}})))
    u_max = metrics["replay/u_max"]
    assert u_max.aggregation == AggregationType.MAX  # max over micro-batches and dp ranks, not a mean
    assert u_max.aggregate() == pytest.approx(math.exp(EXTREME_LOG_U), rel=1e-9)
    above = metrics["replay/u_above_10"]
    assert above.aggregate() == pytest.approx(1 / TOKENS, rel=1e-9)  # 1 of the 100 replayed tokens
    assert int((log_u[-1] > math.log(10)).sum()) == 1
    # the weight diagnostic reports the capped weights
    expected = float(capped_term(divergence, log_u[-1], DEFAULT_MAX_WEIGHT)[1].mean())
    assert metrics["replay/weight_mean"].aggregate() == pytest.approx(expected, rel=1e-9)


def test_u_max_is_zero_without_replay_tokens():
    td, flat, offsets, _ = _minibatch()
    td["replay_mask"] = torch.zeros(FRESH_ROWS + 1)
    for k, v in minibatch_normalizer_fields(td["replay_mask"] > 0.5, torch.full((FRESH_ROWS + 1,), TOKENS),
                                            mini_batch_size=FRESH_ROWS + 1).items():
        td[k] = v
    out = {"log_probs": torch.nested.nested_tensor_from_jagged(flat, offsets)}
    _, metrics = replay_aware_loss(_actor(), out, td, spec=dyjr_loss_spec(DyJRConfig()))
    assert metrics["replay/u_max"].aggregate() == 0.0 and metrics["replay/u_above_10"].aggregate() == 0.0


# -- the capped term -----------------------------------------------------------------------------


@pytest.mark.parametrize("divergence", ["js", "forward_kl"])
@pytest.mark.parametrize("cap", [0.05, 1.0, DEFAULT_MAX_WEIGHT, 1e3])
def test_the_knee_is_where_the_weight_reaches_the_cap(divergence, cap):
    knee = weight_knee(divergence, cap)
    assert knee > 0
    weight = PLAIN[divergence][1](torch.tensor(knee, dtype=torch.float64))
    assert float(weight) == pytest.approx(cap, rel=1e-12)


def test_default_knees():
    # u ~ 7.1 (JS) and u = 5 (forward KL): ordinary drift (|log u| < 1) is far below them
    assert math.exp(weight_knee("js", DEFAULT_MAX_WEIGHT)) == pytest.approx(7.12, abs=0.01)
    assert math.exp(weight_knee("forward_kl", DEFAULT_MAX_WEIGHT)) == pytest.approx(5.0, rel=1e-12)


@pytest.mark.parametrize("divergence", ["js", "forward_kl"])
def test_capped_term_is_the_term_below_the_knee_and_linear_above(divergence):
    f, w = PLAIN[divergence]
    cap = 2.0
    knee = weight_knee(divergence, cap)
    lu = torch.linspace(-20, 20, 4001, dtype=torch.float64).requires_grad_()
    value, weight = capped_term(divergence, lu, cap)
    value.sum().backward()
    below = lu.detach() <= knee
    assert torch.allclose(value[below], f(lu.detach()[below]), rtol=1e-12, atol=1e-15)
    knee_value = float(f(torch.tensor(knee, dtype=torch.float64)))
    assert torch.allclose(value[~below], knee_value + cap * (lu.detach()[~below] - knee), rtol=1e-12)
    # gradient = min(w, cap), reported as the weight; a continuous value, >= 0 with its minimum 0 at
    # u = 1, and on the u > 1 side a non-decreasing weight (convex in log u there)
    assert torch.allclose(lu.grad, torch.minimum(w(lu.detach()), torch.tensor(cap, dtype=torch.float64)), rtol=1e-9)
    assert torch.allclose(weight, lu.grad, rtol=1e-9) and float(lu.grad.max()) == pytest.approx(cap, rel=1e-9)
    v = value.detach()
    assert float((v[1:] - v[:-1]).abs().max()) < 0.05
    assert float(v.min()) >= 0 and abs(float(lu[v.argmin()])) < 0.011  # the grid point nearest u = 1
    second = v[2:] - 2 * v[1:-1] + v[:-2]
    assert float(second[lu.detach()[1:-1] > 0].min()) > -1e-9
    plain, plain_weight = capped_term(divergence, lu.detach(), None)
    assert torch.allclose(plain, f(lu.detach()), rtol=1e-12) and torch.allclose(plain_weight, w(lu.detach()), rtol=1e-12)


# -- the setting ---------------------------------------------------------------------------------


def test_setting_reaches_the_spec_and_pickles():
    spec = dyjr_loss_spec(DyJRConfig.from_dict({"js": {"max_weight": 9.5}}))
    assert isinstance(spec, DivergenceSpec) and spec.max_weight == 9.5
    assert pickle.loads(pickle.dumps(make_replay_loss_fn(_actor(), spec))).keywords["spec"] == spec
    assert dyjr_loss_spec(DyJRConfig.from_dict({"js": {"max_weight": None}})).max_weight is None  # null: no cap
    assert dyjr_loss_spec(DyJRConfig()).max_weight == DEFAULT_MAX_WEIGHT
    with pytest.raises(ValueError, match="max_weight"):
        DivergenceSpec(kind="js", max_weight=0.0)


@pytest.mark.parametrize("node, line", [
    ({"js": {"max_weight": 0}}, "dyjr.js.max_weight must be > 0, got 0.0"),
    ({"js": {"max_weight": -1.0}}, "dyjr.js.max_weight must be > 0, got -1.0"),
    ({"js": {"max_weight": float("inf")}}, "dyjr.js.max_weight must be a finite number"),
    ({"js": {"estimator": "topk", "max_weight": 8.0}}, "dyjr.js.max_weight caps the sampled estimator's weight"),
    ({"replay": {"as_pg": True}, "js": {"max_weight": None}}, "dyjr.replay.as_pg replaces the divergence term, so "
                                                              "dyjr.js.max_weight=None would be ignored"),
])
def test_bad_or_ignored_values_are_one_line(node, line):
    with pytest.raises(ConfigError) as info:
        DyJRConfig.from_dict(node)
    assert len(info.value.errors) == 1 and info.value.errors[0].startswith(line), info.value.errors
