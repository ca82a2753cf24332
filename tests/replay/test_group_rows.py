"""Group replay assembly, shared by RLEP and Ex-GRPO: a replayed row in verl's v1 row layout, its
TransferQueue key and GRPO group, the advantage over fresh + replayed rows computed by verl's own
function, the reward-worker input, the mini-batch plan and the spreading of replayed rows over the
optimizer steps."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch
from tensordict import NonTensorStack, TensorDict

from dyjr_verl.replay.codec import padding_rows, rows_to_td, td_column, td_to_rows
from dyjr_verl.replay.group_rows import make_replay_row
from dyjr_verl.replay.group_rows import reward_input as _reward_input
from dyjr_verl.replay.layout import plan_minibatches, spread_rows

P, R = 5, 3  # prompt and template-response lengths


def template(uid: str = "u1", session: int = 0) -> tuple[dict, dict]:
    prompts = torch.arange(10, 10 + P)
    responses = torch.tensor([40, 41, 42])
    row = {
        "prompts": prompts, "responses": responses, "input_ids": torch.cat([prompts, responses]),
        "position_ids": torch.arange(P + R), "response_mask": torch.ones(R, dtype=torch.int64),
        "loss_mask": torch.ones(R, dtype=torch.int64), "rm_scores": torch.tensor([0.0, 0.0, 0.0]),
        "rollout_log_probs": torch.tensor([-0.1, -0.2, -0.3]), "dummy_tensor": torch.zeros(1, dtype=torch.uint8),
        "uid": uid, "session_id": session, "raw_prompt": [{"role": "user", "content": "q"}],
        "data_source": "src", "reward_model": {"ground_truth": "7"}, "extra_info": {"index": 3},
        "extra_fields": {"reward_extra_info": {"acc": 0.0}, "min_global_steps": 1}, "num_turns": 2,
    }
    tag = {"status": "success", "prompt_len": P, "response_len": R, "seq_len": P + R, "global_steps": 1}
    return row, tag


def test_replayed_row_has_the_template_prompt_and_a_new_response():
    tmpl, tag = template()
    row, new_tag = make_replay_row(tmpl, tag, [7, 8, 9, 2], score=1.0, session_id=4)
    assert row["uid"] == "u1" and row["raw_prompt"] == tmpl["raw_prompt"]  # same GRPO group, same question
    assert row["responses"].tolist() == [7, 8, 9, 2]
    assert row["input_ids"].tolist() == list(range(10, 15)) + [7, 8, 9, 2]
    assert row["position_ids"].tolist() == list(range(P + 4))
    assert row["response_mask"].tolist() == [1, 1, 1, 1] and row["loss_mask"].tolist() == [1, 1, 1, 1]
    assert row["rm_scores"].tolist() == [0.0, 0.0, 0.0, 1.0]  # the score on the last token, as verl writes it
    assert row["rollout_log_probs"].tolist() == [0.0] * 4  # on-policy rows: replaced after old log-probs
    assert row["session_id"] == 4 and row["extra_fields"]["reward_extra_info"] == {}
    assert row["extra_fields"]["min_global_steps"] == 1 and tmpl["extra_fields"]["reward_extra_info"] == {"acc": 0.0}
    assert new_tag == {**tag, "prompt_len": P, "response_len": 4, "seq_len": P + 4, "is_replay": True, "is_padding": False}
    assert tag.get("is_replay") is None  # the template's tag is untouched

    lp = torch.tensor([-1.0, -2.0, -3.0, -4.0])
    row, _ = make_replay_row(tmpl, tag, [7, 8, 9, 2], score=0.0, session_id=5, rollout_log_probs=lp)
    assert row["rollout_log_probs"].tolist() == lp.tolist()


def test_replayed_row_refuses_what_it_cannot_rebuild():
    tmpl, tag = template()
    with pytest.raises(ValueError):
        make_replay_row(tmpl, tag, [], score=1.0, session_id=1)
    with pytest.raises(ValueError, match="rollout_log_probs"):
        make_replay_row(tmpl, tag, [1, 2], score=1.0, session_id=1, rollout_log_probs=torch.zeros(3))
    bad = dict(tmpl, routed_experts=torch.zeros(P + R, 2))  # per-token field of unknown meaning
    with pytest.raises(NotImplementedError, match="routed_experts"):
        make_replay_row(bad, tag, [1, 2], score=1.0, session_id=1)
    mrope = dict(tmpl, position_ids=torch.zeros(3, P + R, dtype=torch.int64))
    with pytest.raises(NotImplementedError, match="position_ids"):
        make_replay_row(mrope, tag, [1, 2], score=1.0, session_id=1)


def test_padding_rows_are_short_no_ops_in_their_own_group():
    tmpl, tag = template()
    rows, tags = padding_rows(tmpl, tag, 3, eos_token_id=2)
    assert len(rows) == 3 and padding_rows(tmpl, tag, 0, eos_token_id=2) == ([], [])
    assert len({r["uid"] for r in rows}) == 1 and rows[0]["uid"].startswith("pad") and rows[0]["uid"] != "u1"
    for r, t in zip(rows, tags):
        assert r["responses"].tolist() == [2] and r["response_mask"].tolist() == [0] and r["loss_mask"].tolist() == [0]
        assert r["rm_scores"].tolist() == [0.0] and r["input_ids"].numel() == P + 1  # the real prompt, not 128 tokens
        assert t["is_padding"] is True and t["is_replay"] is False and t["seq_len"] == P + 1
    assert [r["session_id"] for r in rows] == [0, 1, 2]


def test_replayed_rows_pack_into_transferqueue_layout_like_the_template():
    tmpl, tag = template()
    nested = lambda xs: torch.nested.as_nested_tensor(list(xs), layout=torch.jagged)  # noqa: E731
    like = TensorDict({
        **{k: nested([tmpl[k]]) for k in ("prompts", "responses", "input_ids", "position_ids", "response_mask",
                                           "loss_mask", "rm_scores", "rollout_log_probs")},
        "dummy_tensor": tmpl["dummy_tensor"][None],
        **{k: NonTensorStack(tmpl[k]) for k in ("uid", "session_id", "raw_prompt", "data_source", "reward_model",
                                                 "extra_info", "extra_fields", "num_turns")},
    }, batch_size=[1])
    (back,) = td_to_rows(like)
    rows = [make_replay_row(back, tag, ids, score=1.0, session_id=4 + i)[0] for i, ids in enumerate(([1, 2], [3, 4, 5, 6]))]
    td = rows_to_td(rows, like)
    assert td["responses"].is_nested and td["responses"].offsets().diff().tolist() == [2, 4]
    assert td["rm_scores"].to_padded_tensor(-1).tolist() == [[0.0, 1.0, -1, -1], [0.0, 0.0, 0.0, 1.0]]
    assert td_column(td, "uid") == ["u1", "u1"]


def test_grpo_advantage_is_over_fresh_and_replayed_rows_of_the_group():
    """verl's v1 advantage groups by the ``uid`` field and treats each ``{prefix}_{session}`` key
    as its own trajectory: replayed rows under a fresh key prefix join their group's baseline."""
    from verl.protocol import DataProto
    from verl.trainer.ppo.v1.utils import compute_advantage_for_multi_trajectories

    scores = {"a": [0, 0, 1, 0], "b": [1, 1, 0, 1]}
    replay = {"a": [1, 1], "b": [1]}
    keys, uids, rewards = [], [], []
    for uid in scores:
        for s, r in enumerate(scores[uid]):
            keys.append(f"{uid}_{s}_0"); uids.append(uid); rewards.append(r)
    for j, (uid, rs) in enumerate((u, r) for u, rr in replay.items() for r in rr):
        keys.append(f"rlep0123abcd_{j}_0"); uids.append(uid); rewards.append(rs)
    keys.append("pad9_0_0"); uids.append("pad9"); rewards.append(0.0)  # verl's padding row
    n, width = len(keys), 3
    mask = torch.ones(n, width)
    token_rewards = torch.zeros(n, width)
    token_rewards[:, -1] = torch.tensor(rewards, dtype=torch.float32)
    data = DataProto.from_dict(
        tensors={"token_level_rewards": token_rewards, "response_mask": mask},
        non_tensors={"uid": np.array(uids, dtype=object)},
    )
    out = compute_advantage_for_multi_trajectories(data, batch_keys=keys, adv_estimator="grpo", num_repeat=4)
    adv = out.batch["advantages"][:, 0]
    for uid in scores:
        group = torch.tensor(scores[uid] + replay[uid], dtype=torch.float32)
        expected = (group - group.mean()) / (group.std() + 1e-6)
        got = torch.stack([adv[i] for i, u in enumerate(uids) if u == uid])
        assert torch.allclose(got, expected, atol=1e-5), (uid, got, expected)
    assert adv[-1] == 0.0


def test_reward_input_is_what_verls_reward_manager_scores():
    from verl.experimental.reward_loop.reward_manager.naive import NaiveRewardManager

    class Tok:
        def decode(self, ids, skip_special_tokens=True):
            return " ".join(str(int(i)) for i in ids)

    seen = {}

    def compute_score(data_source, solution_str, ground_truth, extra_info=None):
        seen.update(data_source=data_source, solution=solution_str, gt=ground_truth, index=extra_info["index"])
        return {"score": 1.0, "acc": True}

    tmpl, tag = template()
    row, _ = make_replay_row(tmpl, tag, [7, 8, 9], score=0.0, session_id=4)
    data = _reward_input(row)
    assert data.batch["attention_mask"].shape == (1, P + 3) and data.non_tensor_batch["raw_prompt"].shape == (1,)
    manager = NaiveRewardManager(config=None, tokenizer=Tok(), compute_score=compute_score)
    result = manager.loop.run_until_complete(manager.run_single(data))
    assert result["reward_score"] == 1.0
    assert seen == {"data_source": "src", "solution": "7 8 9", "gt": "7", "index": 3}
    assert row["extra_info"] == {"index": 3}  # the manager mutates its copy, not the row


def test_minibatch_plan_keeps_the_optimizer_steps_and_divisibility():
    # RLEP tiny: 8 prompts x 4 fresh = 32 rows, 8 replayed, mini-batch 4 prompts x 4 = 16 rows
    assert plan_minibatches(32, 40, rows_per_minibatch=16, row_multiple=4) == (2, 20)
    assert plan_minibatches(32, 32, rows_per_minibatch=16, row_multiple=4) == (2, 16)  # Ex-GRPO: same rows
    assert plan_minibatches(32, 34, rows_per_minibatch=16, row_multiple=4, batch_multiple=16) == (2, 24)
    rng = random.Random(0)
    for _ in range(500):
        base = rng.choice([4, 8, 16, 64]) * rng.choice([1, 2, 4])
        q = rng.choice([1, 2, 4, 8])
        bm = rng.choice([1, 2, 8, 16])
        fresh = base * rng.randint(1, 6) - rng.randint(0, 3)
        total = fresh + rng.randint(0, 2 * fresh)
        steps, rows = plan_minibatches(fresh, total, rows_per_minibatch=base, row_multiple=q, batch_multiple=bm)
        assert steps == math.ceil(fresh / base) and rows % q == 0 and (steps * rows) % bm == 0
        assert steps * rows >= total
        # the smallest such size: every smaller multiple of q is too small or breaks divisibility
        assert all(steps * r < total or (steps * r) % bm for r in range(q, rows, q))


@pytest.mark.parametrize("dp,mb", [(1, 2), (2, 2), (2, 3), (4, 1)])
def test_spread_rows_keeps_ranks_and_deals_replayed_rows_evenly(dp, mb):
    rng = random.Random(dp * 10 + mb)
    per = 6
    n = dp * mb * per
    is_replay = [rng.random() < 0.3 for _ in range(n)]
    order = spread_rows(is_replay, dp, mb)
    assert sorted(order) == list(range(n))
    chunk = n // dp
    for d in range(dp):
        part = order[d * chunk : (d + 1) * chunk]
        assert {i // chunk for i in part} == {d}  # rows stay on their rank
        counts = [sum(is_replay[i] for i in part[j * per : (j + 1) * per]) for j in range(mb)]
        assert max(counts) - min(counts) <= 1
        fresh = [i for i in part if not is_replay[i]]
        assert fresh == sorted(fresh)  # otherwise order is kept
    with pytest.raises(ValueError):
        spread_rows([False] * 7, 2, 1)
