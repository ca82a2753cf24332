"""DyJR's two ablation modes: ``dyjr.buffer.frozen`` (a static reference filled once) and
``dyjr.replay.as_pg`` (replayed rows through a clipped PG term with their stored advantage)."""

from __future__ import annotations

import logging
import pickle

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from tensordict import NonTensorStack, TensorDict
from transfer_queue import KVBatchMeta
from verl.trainer.ppo.core_algos import agg_loss, compute_policy_loss_vanilla
from verl.utils import tensordict_utils as tu
from verl.workers.config import ActorConfig, PolicyLossConfig
from verl.workers.utils.padding import no_padding_2_padding

from dyjr_verl.methods.dyjr.buffer import TimeSensitiveBuffer, buffer_digest
from dyjr_verl.methods.dyjr.config import BufferConfig, DyJRConfig
from dyjr_verl.methods.dyjr.divergence import CLIPPED_PG_TERM, ClippedPGSpec, clipped_pg_from_log, dyjr_loss_spec
from dyjr_verl.methods.dyjr.trainer import DyJRTrainer, trajectory_advantage
from dyjr_verl.replay.config import ConfigError
from dyjr_verl.replay.layout import UpdateShape
from dyjr_verl.replay.loss import replay_aware_loss
from dyjr_verl.replay.rows import Trajectory, minibatch_normalizer_fields
from dyjr_verl.replay.terms import make_replay_loss_fn
from dyjr_verl.replay.update_strategy import replay_at_update, store_fresh_rows
from fake_tq import FakeTransferQueue, jagged

PID = "train"


def traj(i: int, step: int, reward: float = 1.0) -> Trajectory:
    return Trajectory(prompt_ids=[1, 2], response_ids=[10 + i, 11 + i], response_mask=[1, 1],
                      logprobs=[-0.1 * i, -0.2], reward=reward, uid=f"u{step}_{i}", step=step)


def content_digest(buf: TimeSensitiveBuffer) -> str:
    state = buf.state_dict()
    return buffer_digest({"blocks": state["blocks"]})  # the stored rows only (the step moves on)


# -- frozen buffer ------------------------------------------------------------------------------------


def test_frozen_buffer_keeps_its_first_fill_and_never_evicts_by_age():
    buf = TimeSensitiveBuffer(BufferConfig(frozen=True, max_age=1))
    buf.advance(1)
    assert buf.push(1, [traj(i, 1) for i in range(3)] + [traj(9, 1, reward=0.0)]) == {"admitted": 3, "rejected": 1}
    filled = content_digest(buf)
    for step in range(2, 7):  # far beyond max_age = 1
        buf.advance(step)
        assert buf.push(step, [traj(i, step) for i in range(4)]) == {"admitted": 0, "rejected": 0}
        m = buf.metrics(prefix="")
        assert len(buf) == 3 and content_digest(buf) == filled
        assert m["age_mean"] == m["age_max"] == step - 1  # ages grow
        assert m["evicted"] == 0 and m["admitted"] == 0 and m["evicted_total"] == 0 and m["admitted_total"] == 3
    assert {t.uid for t in buf} == {"u1_0", "u1_1", "u1_2"}
    assert {t.uid for t in buf.sample(10, 0)} == {"u1_0", "u1_1", "u1_2"}

    moving = TimeSensitiveBuffer(BufferConfig(frozen=False, max_age=1))  # the same pushes, not frozen
    for step in range(1, 7):
        moving.push(step, [traj(i, step) for i in range(3)])
    assert {t.step for t in moving} == {5, 6}


def test_frozen_fill_respects_admission_and_capacity():
    buf = TimeSensitiveBuffer(BufferConfig(frozen=True, capacity=2))
    buf.push(1, [traj(0, 1), traj(1, 1, reward=0.0), traj(2, 1), traj(3, 1)], rng=np.random.default_rng(0))
    kept = [t.uid for t in buf]  # a seeded random `capacity` of the fill's admitted rows, in push order
    assert len(kept) == 2 and set(kept) < {"u1_0", "u1_2", "u1_3"} and kept == sorted(kept)
    assert buf.metrics(prefix="")["rejected"] == 1 and not buf.accepting


def test_frozen_fill_waits_for_the_first_step_that_admits_anything(caplog):
    buf = TimeSensitiveBuffer(BufferConfig(frozen=True))
    with caplog.at_level(logging.WARNING):
        buf.push(1, [traj(0, 1, reward=0.0)])
    assert "admitted nothing" in caplog.text and "waits for the next step" in caplog.text
    assert len(buf) == 0 and buf.accepting  # not filled yet: an empty reference would make the run GRPO
    buf.push(2, [traj(1, 2), traj(2, 2, reward=0.0)])  # the fill: step 2's admitted rows
    assert [t.step for t in buf] == [2] and not buf.accepting
    buf.push(3, [traj(3, 3)])
    assert [t.step for t in buf] == [2] and buf.metrics()["buffer/age_max"] == 1.0  # never refreshed, only ages


def test_frozen_state_round_trip_and_mode_mismatch():
    cfg = BufferConfig(frozen=True, max_age=1)
    buf = TimeSensitiveBuffer(cfg)
    buf.push(1, [traj(i, 1) for i in range(2)])
    for step in (2, 3, 4):
        buf.push(step, [traj(5, step)])
    state = buf.state_dict()

    resumed = TimeSensitiveBuffer(cfg)
    resumed.load_state_dict(state)  # no age eviction on load either
    assert content_digest(resumed) == content_digest(buf) and resumed.step == 4 and not resumed.accepting
    resumed.push(5, [traj(7, 5)])
    assert len(resumed) == 2

    with pytest.raises(ValueError, match="frozen=true, resumed with false"):
        TimeSensitiveBuffer(BufferConfig(max_age=1)).load_state_dict(state)
    fifo = TimeSensitiveBuffer(BufferConfig())
    fifo.push(1, [traj(0, 1)])
    with pytest.raises(ValueError, match="frozen=false, resumed with true"):
        TimeSensitiveBuffer(cfg).load_state_dict(fifo.state_dict())


# -- the clipped PG term --------------------------------------------------------------------------------

# (ratio, advantage, expected loss, expected d loss / d log u) with clip 0.2 / 0.28, dual clip 3
CASES = [
    (1.1, 1.0, -1.1, -1.1),  # inside the range: -A r, gradient -A r
    (1.5, 1.0, -1.28, 0.0),  # A > 0 above 1 + 0.28: clipped, no gradient
    (0.5, 1.0, -0.5, -0.5),  # A > 0 below 1 - 0.2: PPO does not clip this side
    (1.1, -2.0, 2.2, 2.2),  # inside
    (0.5, -2.0, 1.6, 0.0),  # A < 0 below 0.8: clipped at 0.8
    (1.5, -1.0, 1.5, 1.5),  # A < 0 above the range: not clipped (below the dual clip)
    (5.0, -2.0, 6.0, 0.0),  # A < 0, -A r = 10 > -A c = 6: dual clip
]


def test_clipped_pg_values_and_gradients_by_hand():
    ratio = torch.tensor([c[0] for c in CASES], dtype=torch.float64)
    adv = torch.tensor([c[1] for c in CASES], dtype=torch.float64)
    log_u = ratio.log().requires_grad_()
    loss, active = clipped_pg_from_log(log_u, adv, 0.2, 0.28, 3.0)
    loss.sum().backward()
    assert loss.tolist() == pytest.approx([c[2] for c in CASES], abs=1e-12)
    assert log_u.grad.tolist() == pytest.approx([c[3] for c in CASES], abs=1e-12)
    assert active.tolist() == [c[3] == 0.0 for c in CASES]


def test_clipped_pg_matches_verls_vanilla_loss():
    g = torch.Generator().manual_seed(0)
    old = -torch.rand(5, 9, generator=g, dtype=torch.float64) * 3
    log_prob = (old + torch.randn(5, 9, generator=g, dtype=torch.float64) * 0.6).requires_grad_()
    adv = torch.randn(5, 1, generator=g, dtype=torch.float64).expand(5, 9) * 2
    mask = torch.rand(5, 9, generator=g) > 0.2
    cfg = ActorConfig(strategy="fsdp", rollout_n=1, ppo_micro_batch_size_per_gpu=1, clip_ratio_low=0.2,
                      clip_ratio_high=0.28, clip_ratio_c=2.5)  # global_batch_info {}: local token mean
    theirs, _ = compute_policy_loss_vanilla(old, log_prob, adv, mask, "token-mean", cfg)
    (g_theirs,) = torch.autograd.grad(theirs, log_prob)
    mat, _ = clipped_pg_from_log(log_prob - old, adv, 0.2, 0.28, 2.5)
    ours = agg_loss(loss_mat=mat, loss_mask=mask, loss_agg_mode="token-mean")
    (g_ours,) = torch.autograd.grad(ours, log_prob)
    assert float(ours) == pytest.approx(float(theirs), rel=1e-12)
    assert torch.allclose(g_ours, g_theirs, atol=1e-14)


def _actor(**kw) -> ActorConfig:
    return ActorConfig(strategy="fsdp", rollout_n=2, ppo_micro_batch_size_per_gpu=1,
                       policy_loss=PolicyLossConfig(loss_mode="vanilla"), loss_agg_mode="token-mean", **kw)


def test_loss_spec_as_pg_takes_the_actors_clip_bounds_and_the_replay_settings():
    cfg = DyJRConfig.from_dict({"replay": {"as_pg": True}, "js": {"coef": 0.3, "normalizer": "joint"}})
    spec = dyjr_loss_spec(cfg, actor=_actor(clip_ratio_low=0.15, clip_ratio_high=0.28))
    assert isinstance(spec, ClippedPGSpec) and spec.kind == CLIPPED_PG_TERM
    assert (spec.clip_low, spec.clip_high, spec.clip_c) == (0.15, 0.28, 3.0)
    assert spec.resolved_coef == 0.3 and spec.resolved_normalizer == "joint"
    assert pickle.loads(pickle.dumps(make_replay_loss_fn(_actor(), spec))).keywords["spec"] == spec  # to the workers
    assert dyjr_loss_spec(DyJRConfig()).kind == "js"  # the default is untouched
    with pytest.raises(ValueError, match="actor config"):
        dyjr_loss_spec(cfg)


def _replay_batch():
    """Four rows (1 and 3 replayed) of one micro-batch = one mini-batch, and a leaf log-prob tensor."""
    g = torch.Generator().manual_seed(3)
    p_lens, r_lens, replay = [2, 1, 3, 2], [3, 4, 2, 5], [0.0, 1.0, 0.0, 1.0]
    rows = {k: [] for k in ("prompts", "responses", "input_ids", "response_mask", "old_log_probs", "advantages",
                            "stored_log_probs")}
    for i, (p, r) in enumerate(zip(p_lens, r_lens)):
        prompt, response = torch.randint(0, 7, (p,), generator=g), torch.randint(0, 7, (r,), generator=g)
        rows["prompts"].append(prompt)
        rows["responses"].append(response)
        rows["input_ids"].append(torch.cat([prompt, response]))
        rows["response_mask"].append(torch.ones(r, dtype=torch.int64))
        rows["old_log_probs"].append(-torch.rand(r, generator=g, dtype=torch.float64))
        rows["advantages"].append(torch.full((r,), [0.7, 1.3, -0.4, -0.9][i], dtype=torch.float64))
        rows["stored_log_probs"].append(-torch.rand(r, generator=g, dtype=torch.float64) * 2)
    td = tu.get_tensordict({k: torch.nested.as_nested_tensor(v, layout=torch.jagged) for k, v in rows.items()}
                           | {"replay_mask": torch.tensor(replay)})
    td["loss_mask"] = td["response_mask"]
    for k, v in minibatch_normalizer_fields(torch.tensor(replay) > 0.5, torch.tensor(r_lens), mini_batch_size=4).items():
        td[k] = v
    tu.assign_non_tensor(td, dp_size=1, batch_num_tokens=sum(r_lens), global_batch_size=4)
    total = sum(p + r for p, r in zip(p_lens, r_lens))
    offsets = torch.tensor(np.cumsum([0] + [p + r for p, r in zip(p_lens, r_lens)]))
    flat = (-torch.rand(total, generator=g, dtype=torch.float64) * 2).requires_grad_()
    return td, flat, offsets


def _loss_and_grad(spec, td, flat, offsets):
    flat = flat.detach().clone().requires_grad_()
    out = {"log_probs": torch.nested.nested_tensor_from_jagged(flat, offsets)}
    loss, metrics = replay_aware_loss(_actor(clip_ratio_high=0.28), out, td, spec=spec)
    loss.backward()
    return float(loss), flat.grad, metrics, flat


def test_as_pg_replaces_the_divergence_in_the_replay_aware_loss():
    td, flat, offsets = _replay_batch()
    cfg = DyJRConfig.from_dict({"replay": {"as_pg": True}, "js": {"coef": 0.5}})
    pg = dyjr_loss_spec(cfg, actor=_actor(clip_ratio_high=0.28))
    loss, grad, metrics, _ = _loss_and_grad(pg, td, flat, offsets)
    fresh_loss, fresh_grad, _, _ = _loss_and_grad(ClippedPGSpec(kind=CLIPPED_PG_TERM, coef=0.0), td, flat, offsets)

    # by hand: 0.5 x token mean over the replay tokens of the clipped PG term with the stored advantages
    leaf = flat.detach().clone().requires_grad_()
    lp = no_padding_2_padding(torch.nested.nested_tensor_from_jagged(leaf, offsets), td)
    pad = td.select("response_mask", "stored_log_probs", "advantages").to_padded_tensor()
    mask = pad["response_mask"].bool() & (td["replay_mask"] > 0.5)[:, None]
    mat, _ = clipped_pg_from_log(torch.where(mask, lp - pad["stored_log_probs"], torch.zeros_like(lp)),
                                 torch.where(mask, pad["advantages"], torch.zeros_like(lp)), 0.2, 0.28, 3.0)
    replay = (mat * mask).sum() / mask.sum()
    (0.5 * replay).backward()

    assert loss - fresh_loss == pytest.approx(0.5 * float(replay), rel=1e-9)  # no lambda * JS on top
    assert torch.allclose(grad - fresh_grad, leaf.grad, atol=1e-12)
    assert metrics["replay/term"].values == pytest.approx([float(replay)], rel=1e-9)  # the same metric key
    js_loss, _, _, _ = _loss_and_grad(dyjr_loss_spec(DyJRConfig.from_dict({"js": {"coef": 0.5}})), td, flat, offsets)
    assert abs((js_loss - fresh_loss) - 0.5 * float(replay)) > 1e-3  # the JS term would differ


# -- the stored advantage travels with the trajectory ---------------------------------------------------


def _trainer(**node) -> DyJRTrainer:
    """The DyJR trainer's method hooks without verl's trainer (no Ray, no workers)."""
    t = DyJRTrainer.__new__(DyJRTrainer)
    t.method_config = DyJRConfig.from_dict(node)
    t._rows_per_step = None  # what __init__ reads from data.train_batch_size x rollout.n
    t.store = t.build_store()
    t._replay_rng = np.random.default_rng(0)
    t.config = OmegaConf.create({"actor_rollout_ref": {"actor": {"clip_ratio": 0.2}}, "data": {"max_response_length": 8}})
    return t


def _fresh_step(tq: FakeTransferQueue, step: int, n: int = 6) -> KVBatchMeta:
    """``n`` fresh rows; row i: reward i % 2, GRPO-style advantage (i - 2.5) / 2 on every token."""
    lengths = [2 + i % 2 for i in range(n)]
    prompts = [[10 + i, 11] for i in range(n)]
    responses = [[100 + i + step] * length for i, length in enumerate(lengths)]
    fields = {
        "prompts": jagged(prompts, torch.int64), "responses": jagged(responses, torch.int64),
        "response_mask": jagged([[1] * length for length in lengths], torch.int64),
        "input_ids": jagged([p + r for p, r in zip(prompts, responses)], torch.int64),
        "position_ids": jagged([list(range(2 + length)) for length in lengths], torch.int64),
        "old_log_probs": jagged([[-0.5] * length for length in lengths], torch.float32),
        "rollout_log_probs": jagged([[-0.3] * length for length in lengths], torch.float32),
        "advantages": jagged([[(i - 2.5) / 2] * length for i, length in enumerate(lengths)], torch.float32),
        "rm_scores": jagged([[0.0] * (length - 1) + [float(i % 2)] for i, length in enumerate(lengths)], torch.float32),
        "uid": NonTensorStack(*[f"s{step}g{i // 2}" for i in range(n)]),
    }
    keys = [f"s{step}g{i // 2}_{i % 2}_0" for i in range(n)]
    tags = [{"status": "success", "prompt_len": 2, "response_len": lengths[i], "seq_len": 2 + lengths[i]} for i in range(n)]
    meta = tq.kv_batch_put(keys=keys, partition_id=PID, fields=TensorDict(fields, batch_size=[n]), tags=tags)
    return KVBatchMeta(partition_id=PID, keys=keys, tags=tags, fields=meta.fields)


def _step(t: DyJRTrainer, tq: FakeTransferQueue, step: int):
    """One actor update's replay part: replayed rows' advantages, then the store of the fresh rows."""
    batch = _fresh_step(tq, step)
    t.before_update(step)
    with replay_at_update(tq, batch, t, UpdateShape(fresh_rows=6, minibatch_rows=6, dp=1, micro=1), shuffle=False) as up:
        replayed = [] if not up.replay_keys else tq.kv_batch_get(
            keys=up.replay_keys, partition_id=PID, select_fields=["advantages"])["advantages"].unbind(0)
        drawn = list(up.drawn)
    n_calls = len(tq.calls)
    store_fresh_rows(tq, batch, up, t, step)
    return drawn, [r.tolist() for r in replayed], tq.calls[n_calls:]


def test_as_pg_stores_the_advantage_of_admitted_rows_only_and_replays_it():
    t = _trainer(replay={"as_pg": True, "size": 2})
    tq = FakeTransferQueue()
    _, _, reads = _step(t, tq, 1)
    (read,) = [c for c in reads if c[0] == "get"]
    assert read[1] == 3 and "advantages" in read[2]  # the 3 admitted (correct) rows, not the whole step
    assert sorted(tr.record for tr in t.store) == [-0.75, 0.25, 1.25]  # (i - 2.5) / 2 for i = 1, 3, 5
    drawn, replayed, _ = _step(t, tq, 2)
    assert len(drawn) == 2
    for tr, adv in zip(drawn, replayed):
        assert adv == pytest.approx([tr.record] * len(tr.response_ids))

    plain = _trainer(replay={"size": 2})  # DyJR proper: no advantage read, zero placeholders
    tq = FakeTransferQueue()
    _, _, reads = _step(plain, tq, 1)
    assert all("advantages" not in (c[2] or ()) for c in reads)
    assert all(tr.record is None for tr in plain.store)
    _, replayed, _ = _step(plain, tq, 2)
    assert replayed and all(set(a) == {0.0} for a in replayed)


def test_frozen_trainer_reads_nothing_after_the_fill():
    t = _trainer(buffer={"frozen": True, "max_age": 1}, replay={"size": 2})
    tq = FakeTransferQueue()
    _step(t, tq, 1)
    filled = content_digest(t.store)
    for step in (2, 3, 4):
        drawn, _, reads = _step(t, tq, step)
        assert [c for c in reads if c[0] == "get"] == []  # no tokens read for rows it would not keep
        assert len(drawn) == 2 and {d.step for d in drawn} == {1}
        assert content_digest(t.store) == filled


@pytest.mark.parametrize("buffer", [{"frozen": True}, {}], ids=["frozen", "fifo"])
def test_a_store_smaller_than_the_draw_is_replayed_with_replacement_at_the_configured_share(buffer):
    t = _trainer(buffer=buffer, replay={"size": 4})
    assert t.draw_rows(4) == []  # empty: nothing to replay
    t.store.push(1, [traj(0, 1)])
    if not buffer:  # a FIFO window keeps a second row; a filled frozen store would take nothing more
        t.store.push(1, [traj(1, 1)])
    drawn = t.draw_rows(4)
    held = {"u1_0"} if buffer else {"u1_0", "u1_1"}
    assert len(drawn) == 4 and {d.uid for d in drawn} == held  # every held row, then reused ones


def test_trajectory_advantage_is_one_value_per_row():
    assert trajectory_advantage(torch.tensor([0.5, 0.5, 0.0])) == 0.5  # a masked token holds 0
    assert trajectory_advantage(torch.zeros(3)) == 0.0
    with pytest.raises(ValueError, match="outcome-level"):
        trajectory_advantage(torch.tensor([0.5, 0.4, 0.3]))


# -- config ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("node, message", [
    ({"buffer": {"frozen": True, "window": "adaptive"}}, "dyjr.buffer.window must be 'fixed' with frozen=true"),
    ({"replay": {"as_pg": True}, "js": {"estimator": "topk"}}, "dyjr.js.estimator=topk would be ignored"),
    ({"replay": {"as_pg": True}, "js": {"divergence": "forward_kl"}}, "dyjr.js.divergence=forward_kl would be ignored"),
    ({"replay": {"as_pg": True}, "js": {"coef": 0.0}}, "dyjr.js.coef=0 trains nothing"),
    ({"enable": False, "buffer": {"frozen": True}}, "dyjr.buffer.frozen has no effect with dyjr.enable=false"),
    ({"enable": False, "replay": {"as_pg": True}}, "dyjr.replay.as_pg has no effect with dyjr.enable=false"),
])
def test_meaningless_combinations_are_refused_in_one_line(node, message):
    with pytest.raises(ConfigError) as exc:
        DyJRConfig.from_dict(node)
    assert len(exc.value.errors) == 1 and message in exc.value.errors[0]


def test_modes_parse_and_need_an_outcome_advantage():
    cfg = DyJRConfig.from_dict({"buffer": {"frozen": True}, "replay": {"as_pg": True}})
    assert cfg.buffer.frozen and cfg.replay.as_pg and cfg.replay.size == 0.125
    verl = OmegaConf.create({"algorithm": {"adv_estimator": "gae"}, "actor_rollout_ref": {"actor": {}}})
    problems = cfg.verl_problems(verl)
    assert len(problems) == 1 and "adv_estimator" in problems[0] and "gae" in problems[0]
    verl.algorithm.adv_estimator = "grpo"
    assert cfg.verl_problems(verl) == []
    assert DyJRConfig().verl_problems(OmegaConf.create({"algorithm": {"adv_estimator": "gae"}})) == []
