"""The replay-aware loss counts what verl counts: PG diagnostics over the fresh tokens only (an
all-replay micro-batch adds no 0), the fresh normaliser from ``loss_mask`` (rollout rejection
sampling keeps rejected tokens there), and count fields exact above 2^24 tokens."""

from __future__ import annotations

import math

import pytest
import torch
from tensordict import TensorDict

from verl.utils import tensordict_utils as tu
from verl.utils.metric import Metric, reduce_metrics
from verl.utils.py_functional import append_to_dict
from verl.workers.utils.losses import ppo_loss

from dyjr_verl.replay.layout import UpdateShape
from dyjr_verl.replay.loss import replay_aware_loss
from dyjr_verl.replay.rows import (
    FRESH_RESPONSE_TOKENS_KEY,
    FRESH_TOKENS_KEY,
    NORMALIZER_KEYS,
    REPLAY_TOKENS_KEY,
    Trajectory,
    minibatch_normalizer_fields,
)
from dyjr_verl.replay.terms import ReplayLossSpec, make_replay_loss_fn
from dyjr_verl.replay.update_strategy import replay_at_update
from fake_tq import FakeTransferQueue, jagged
from test_loss import V, TinyPolicy, actor_config, add_normalizers, close, engine_grads, make_batch
from test_strategies_with_fake_tq import PID, ListStore

PG_KEYS = ("actor/ppo_kl", "actor/pg_clipfrac", "actor/pg_clipfrac_lower", "actor/pg_loss")
TOL = dict(rel_tol=1e-6, abs_tol=1e-9)  # verl computes the clip fractions in fp32


def verl_logged(minibatches: list[list[list[dict]]]) -> dict[str, float]:
    """What verl logs from the loss's metrics, ``minibatches[k][rank]`` = that rank's micro-batch
    metric dicts: the engine appends a rank's micro-batches (``append_to_dict``), the worker gathers
    the ranks (one entry each) and aggregates every mini-batch (``Metric.aggregate_dp``), the
    trainer averages the mini-batches (``reduce_metrics``)."""
    step: dict = {}
    for ranks in minibatches:
        gathered: dict[str, list] = {}
        for micro_metrics in ranks:
            rank: dict = {}
            for m in micro_metrics:
                append_to_dict(rank, m)
            for key, value in rank.items():
                gathered.setdefault(key, []).append(value)
        append_to_dict(step, {k: Metric.aggregate_dp(v) for k, v in gathered.items() if isinstance(v[0], Metric)})
    return reduce_metrics(step)


def fresh_only(model, cfg, td) -> dict[str, float]:
    """verl's ppo_loss called once on the mini-batch's fresh rows (verl's global scalars for them)."""
    rows = [i for i in range(len(td)) if float(td["replay_mask"][i]) < 0.5]
    sub = tu.index_select_tensor_dict(td, torch.tensor(rows))
    tokens = int(sum(int(m.sum()) for m in sub["loss_mask"].unbind()))
    tu.assign_non_tensor(sub, dp_size=1, batch_num_tokens=tokens, global_batch_size=len(rows))
    with torch.no_grad():
        _, metrics = ppo_loss(cfg, model(sub), sub)
    return {k: float(metrics[k].values[0]) for k in PG_KEYS}


@pytest.mark.parametrize("dp, micro", [(1, 4), (2, 2)])
def test_pg_diagnostics_are_those_of_the_fresh_rows_alone(dp, micro):
    """Rows 0-1 are replay rows: the first micro-batch of rank 0 holds no fresh token, the fresh
    micro-batches hold different numbers of tokens."""
    model, cfg = TinyPolicy(), actor_config()
    fn = make_replay_loss_fn(cfg, ReplayLossSpec(kind="js", coef=0.1))
    td = add_normalizers(make_batch(replay_rows=(0, 1)), mini_batch_size=8, dp_size=dp)
    _, metrics, _ = engine_grads(model, fn, td, micro=micro, dp=dp)
    per_rank = [metrics[r * micro:(r + 1) * micro] for r in range(dp)]
    assert float(per_rank[0][0]["replay/fresh_tokens"].values[0]) == 0.0  # the all-replay micro-batch

    logged = verl_logged([per_rank])
    expected = fresh_only(model, cfg, td)
    assert expected["actor/ppo_kl"] != 0.0 and expected["actor/pg_clipfrac"] > 0.0
    for key in PG_KEYS:
        assert math.isclose(logged[key], expected[key], **TOL), (key, logged[key], expected[key])
    assert logged["replay/rows"] * dp == 2  # replay-side metrics stay under replay/


def test_pg_diagnostics_over_two_minibatches_dp2():
    """verl averages the mini-batches: the logged value is the mean of the fresh-only values."""
    model, cfg = TinyPolicy(), actor_config()
    fn = make_replay_loss_fn(cfg, ReplayLossSpec(kind="js", coef=0.1))
    full = add_normalizers(make_batch(n_rows=16, replay_rows=(0, 1, 4, 10, 11), seed=3), mini_batch_size=8, dp_size=2)
    rank0, rank1 = tu.chunk_tensordict(full, 2)
    minibatches, expected = [], []
    for k in range(2):  # mini-batch k = the k-th block of 4 rows on each rank
        mini = tu.concat_tensordict([tu.chunk_tensordict(r, 2)[k] for r in (rank0, rank1)])
        _, metrics, _ = engine_grads(model, fn, mini, micro=2, dp=2)
        minibatches.append([metrics[:2], metrics[2:]])
        expected.append(fresh_only(model, cfg, mini))
    logged = verl_logged(minibatches)
    for key in PG_KEYS:
        assert math.isclose(logged[key], (expected[0][key] + expected[1][key]) / 2, **TOL), key


# ----------------------------------------------------------------------------------------------
# the fresh normaliser counts loss_mask, as verl's engine does
# ----------------------------------------------------------------------------------------------


def rejection_sampled_step(tq: FakeTransferQueue, n: int = 8):
    """``n`` fresh rows as verl holds them after rollout rejection sampling: ``loss_mask`` keeps every
    response token, ``response_mask`` lost the rejected ones (rows 1, 4 and 6)."""
    g = torch.Generator().manual_seed(5)
    prompts = [torch.randint(0, V, (2 + i % 2,), generator=g).tolist() for i in range(n)]
    responses = [torch.randint(0, V, (3 + i % 3,), generator=g).tolist() for i in range(n)]
    loss_masks = [[1] * len(r) for r in responses]
    masks = [[0 if (i in (1, 4, 6) and j <= i % 2) else 1 for j in range(len(r))] for i, r in enumerate(responses)]
    fields = {
        "prompts": jagged(prompts, torch.int64), "responses": jagged(responses, torch.int64),
        "input_ids": jagged([p + r for p, r in zip(prompts, responses)], torch.int64),
        "position_ids": jagged([list(range(len(p) + len(r))) for p, r in zip(prompts, responses)], torch.int64),
        "response_mask": jagged(masks, torch.int64), "loss_mask": jagged(loss_masks, torch.int64),
        "old_log_probs": jagged([(-torch.rand(len(r), generator=g) * 2).tolist() for r in responses], torch.float32),
        "rollout_log_probs": jagged([(-torch.rand(len(r), generator=g) * 2).tolist() for r in responses], torch.float32),
        "advantages": jagged([[float(torch.randn(1, generator=g))] * len(r) for r in responses], torch.float32),
        "rm_scores": jagged([[0.0] * (len(r) - 1) + [float(i % 2)] for i, r in enumerate(responses)], torch.float32),
    }
    keys = [f"g{i // 2}_{i % 2}_0" for i in range(n)]
    tags = [{"status": "success", "prompt_len": len(p), "response_len": len(r)} for p, r in zip(prompts, responses)]
    meta = tq.kv_batch_put(keys=keys, partition_id=PID, fields=TensorDict(fields, batch_size=[n]), tags=tags)
    return meta


def test_fresh_normaliser_counts_loss_mask_like_verl():
    tq = FakeTransferQueue()
    batch = rejection_sampled_step(tq)
    stored = [Trajectory(prompt_ids=[1, 2], response_ids=[3, 4, 5 - i], response_mask=[1, 1, 1], logprobs=[-1.0] * 3,
                         reward=1.0, uid=f"old{i}", step=1, tags={"status": "success"}) for i in range(2)]
    read = ["prompts", "responses", "input_ids", "response_mask", "loss_mask", "old_log_probs", "advantages",
            "replay_mask", "stored_log_probs", *NORMALIZER_KEYS]
    with replay_at_update(tq, batch, ListStore(stored, replay_rows=2), UpdateShape(8, 8, 1, 1), shuffle=False) as update:
        data = tq.kv_batch_get(keys=update.meta.keys, partition_id=PID, select_fields=read)
    fresh = [i for i in range(len(data)) if float(data["replay_mask"][i]) < 0.5]
    assert len(fresh) == 8 and len(data) == 10
    loss_tokens = sum(int(data["loss_mask"][i].sum()) for i in fresh)
    response_tokens = sum(int(data["response_mask"][i].sum()) for i in fresh)
    assert loss_tokens > response_tokens  # the rejected tokens
    assert data[FRESH_TOKENS_KEY].tolist() == [loss_tokens] * 10
    assert data[FRESH_RESPONSE_TOKENS_KEY].tolist() == [response_tokens] * 10

    # the fresh part (replay term off) is verl's ppo_loss on the fresh rows alone, which divides by loss_mask
    model, cfg = TinyPolicy(), actor_config()
    ours, _, _ = engine_grads(model, make_replay_loss_fn(cfg, ReplayLossSpec(kind="js", coef=0.0)), data, micro=5)
    verl_fn = lambda model_output, data, dp_group=None: ppo_loss(cfg, model_output, data, dp_group)  # noqa: E731
    theirs, _, _ = engine_grads(model, verl_fn, tu.index_select_tensor_dict(data, torch.tensor(fresh)), micro=2)
    assert close(ours, theirs)


# ----------------------------------------------------------------------------------------------
# exact counts
# ----------------------------------------------------------------------------------------------

BIG = 2**24 + 1  # the first integer float32 cannot hold


def test_count_fields_are_exact_above_2_24_tokens():
    rep = torch.tensor([False, True, False, True])
    f = minibatch_normalizer_fields(rep, torch.tensor([BIG, BIG + 2, 0, 0]), mini_batch_size=4)
    assert f[FRESH_TOKENS_KEY].tolist() == [BIG] * 4 and f[REPLAY_TOKENS_KEY].tolist() == [BIG + 2] * 4
    shuffled = minibatch_normalizer_fields(rep, torch.tensor([BIG, BIG + 2, 0, 0]), mini_batch_size=2, shuffle=True)
    assert shuffled[REPLAY_TOKENS_KEY].tolist() == [(BIG + 2) / 2] * 4


def test_loss_uses_the_exact_count():
    """A mini-batch of 2^24 + 1 fresh tokens over all ranks: the fresh part equals verl's ppo_loss
    with that count to the last bit (fp64 log-probs)."""
    model, cfg = TinyPolicy(), actor_config()
    td = add_normalizers(make_batch(), mini_batch_size=8)
    n_fresh = int(sum(1 for x in td["replay_mask"] if float(x) < 0.5))
    td[FRESH_TOKENS_KEY] = torch.full((8,), float(BIG * n_fresh), dtype=torch.float64)  # as the trainer writes it
    tu.assign_non_tensor(td, dp_size=1, batch_num_tokens=10, global_batch_size=8)
    out = model(td)
    ours, _ = replay_aware_loss(cfg, out, td, spec=ReplayLossSpec(kind="js", coef=0.0))
    ref = td.copy()
    keep = [float(x) < 0.5 for x in td["replay_mask"]]
    ref["response_mask"] = torch.nested.as_nested_tensor(
        [m if k else torch.zeros_like(m) for m, k in zip(td["response_mask"].unbind(), keep)], layout=torch.jagged)
    tu.assign_non_tensor(ref, batch_num_tokens=BIG * n_fresh, global_batch_size=float(td["fresh_seqs_in_minibatch"][0]))
    theirs, _ = ppo_loss(cfg, out, ref)
    assert torch.equal(ours, theirs)


def test_bypass_mode_loss_with_an_all_replay_micro_batch():
    """verl's bypass-mode policy loss refuses a micro-batch without a valid token; with replay rows
    only, the loss runs it on their masks and keeps nothing (no gradient, zero-weight metrics), and
    its token-mean diagnostics are those of the fresh rows alone."""
    cfg = actor_config(loss_mode="bypass_mode")
    model = TinyPolicy()
    td = add_normalizers(make_batch(replay_rows=(0, 1)), mini_batch_size=8)
    replay_only = tu.index_select_tensor_dict(td, torch.tensor([0, 1]))
    masked = replay_only.copy()  # the replay rows masked out, as the fresh part sees them
    masked["response_mask"] = torch.nested.as_nested_tensor([torch.zeros_like(m) for m in replay_only["response_mask"].unbind()],
                                                            layout=torch.jagged)
    tu.assign_non_tensor(masked, dp_size=1, batch_num_tokens=30, global_batch_size=8)
    with pytest.raises(ValueError, match="at least one valid token"):
        ppo_loss(cfg, model(masked), masked)

    fn = make_replay_loss_fn(cfg, ReplayLossSpec(kind="js", coef=0.0))
    grad, metrics, _ = engine_grads(model, fn, td, micro=4)
    verl_fn = lambda model_output, data, dp_group=None: ppo_loss(cfg, model_output, data, dp_group)  # noqa: E731
    fresh_rows = tu.index_select_tensor_dict(td, torch.arange(2, 8))
    assert close(grad, engine_grads(model, verl_fn, fresh_rows, micro=3)[0])
    pg_metrics = {k: v for k, v in metrics[0].items() if isinstance(v, Metric) and not k.startswith("replay/")}
    assert "rollout_corr/kl" in pg_metrics and all(float(v.values[0]) == 0.0 for v in pg_metrics.values())

    logged = verl_logged([[metrics]])
    tokens = int(sum(int(m.sum()) for m in fresh_rows["loss_mask"].unbind()))
    tu.assign_non_tensor(fresh_rows, dp_size=1, batch_num_tokens=tokens, global_batch_size=6)
    with torch.no_grad():
        _, expected = ppo_loss(cfg, model(fresh_rows), fresh_rows)
    for key in ("actor/ppo_kl", "actor/pg_clipfrac", "rollout_corr/kl", "rollout_corr/k3_kl", "rollout_corr/chi2_token"):
        assert math.isclose(logged[key], float(expected[key].values[0]), **TOL), key
