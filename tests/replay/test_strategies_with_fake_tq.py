"""Both replay strategies against the in-memory TransferQueue stand-in (tests/fake_tq.py): which
keys are written, what every row carries, what is read, and that every replayed row is cleared."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from tensordict import NonTensorStack, TensorDict
from transfer_queue import KVBatchMeta

from dyjr_verl.replay.codec import td_column, temporary_rows
from dyjr_verl.replay.group_rows import make_replay_row, read_groups, remove_group_rows, write_group_rows
from dyjr_verl.replay.layout import UpdateShape
from dyjr_verl.replay.rows import NORMALIZER_KEYS, REPLAY_MASK_KEY, STORED_LOG_PROBS_KEY, Trajectory
from dyjr_verl.replay.update_strategy import UpdateReplayMethod, replay_at_update, store_fresh_rows
from fake_tq import FakeTransferQueue, jagged

PID = "train"
P = 3  # prompt tokens


def fresh_step(tq: FakeTransferQueue, n: int = 8, *, extra: dict | None = None) -> KVBatchMeta:
    """``n`` fresh rows as verl's v1 trainer holds them at the actor update (2 per prompt group)."""
    lengths = [2 + i % 3 for i in range(n)]
    prompts = [[10 + i, 11, 12] for i in range(n)]
    responses = [[100 + i] * length for i, length in enumerate(lengths)]
    fields = {
        "prompts": jagged(prompts, torch.int64), "responses": jagged(responses, torch.int64),
        "response_mask": jagged([[1] * length for length in lengths], torch.int64),
        "input_ids": jagged([p + r for p, r in zip(prompts, responses)], torch.int64),
        "position_ids": jagged([list(range(P + length)) for length in lengths], torch.int64),
        "old_log_probs": jagged([[-0.5] * length for length in lengths], torch.bfloat16),
        "rollout_log_probs": jagged([[-0.25 - 0.01 * i] * length for i, length in enumerate(lengths)], torch.float32),
        "ref_log_prob": jagged([[-0.4] * length for length in lengths], torch.bfloat16),
        "advantages": jagged([[1.0] * length for length in lengths], torch.float32),
        "returns": jagged([[1.0] * length for length in lengths], torch.float32),
        "rm_scores": jagged([[0.0] * (length - 1) + [float(i % 2)] for i, length in enumerate(lengths)], torch.float32),
        "dummy_tensor": torch.zeros(n, 1, dtype=torch.uint8),
        "uid": NonTensorStack(*[f"g{i // 2}" for i in range(n)]),
        "raw_prompt": NonTensorStack(*[[{"role": "user", "content": f"q{i // 2}"}] for i in range(n)]),
        "data_source": NonTensorStack(*["s"] * n),
        **(extra or {}),
    }
    keys = [f"g{i // 2}_{i % 2}_0" for i in range(n)]
    tags = [{"status": "success", "prompt_len": P, "response_len": lengths[i], "seq_len": P + lengths[i]} for i in range(n)]
    meta = tq.kv_batch_put(keys=keys, partition_id=PID, fields=TensorDict(fields, batch_size=[n]), tags=tags)
    return KVBatchMeta(partition_id=PID, keys=keys, tags=tags, fields=meta.fields)


class ListStore(UpdateReplayMethod):
    """A method whose store is a list: draws the first rows, admits rewards above 0.5."""

    def __init__(self, stored: list[Trajectory], replay_rows: int):
        self.stored, self.replay_rows, self.pushed, self.rejected = list(stored), replay_rows, [], 0

    def target_replay_rows(self, fresh_rows: int) -> int:
        return self.replay_rows

    def draw_rows(self, n: int) -> list[Trajectory]:
        return self.stored[:n]

    def admits(self, reward: float) -> bool:
        return reward > 0.5

    def store_rows(self, step, trajectories, rejected):
        self.pushed += trajectories
        self.rejected += rejected
        return {"stored": float(len(trajectories))}


def stored(i: int, length: int) -> Trajectory:
    return Trajectory(prompt_ids=[7, 8 + i], response_ids=[50 + i] * length, response_mask=[1] * length,
                      logprobs=[-1.0 - i] * length, reward=1.0, uid=f"old{i}", step=1, tags={"status": "success"})


def test_rows_at_the_update_are_interleaved_complete_and_cleared():
    tq = FakeTransferQueue()
    batch = fresh_step(tq)
    method = ListStore([stored(i, 1 + i) for i in range(4)], replay_rows=4)
    shape = UpdateShape(fresh_rows=8, minibatch_rows=4, dp=2, micro=1)
    with replay_at_update(tq, batch, method, shape, shuffle=False) as update:
        meta = update.meta
        assert update.minibatch_rows == 6 and len(meta.keys) == 12 and len(update.replay_keys) == 4
        assert all(k.startswith("replay") and k not in batch.keys for k in update.replay_keys)
        assert {k.split("_")[0] for k in update.replay_keys} != {k.split("_")[0] for k in batch.keys}
        # per rank (6 rows) and mini-batch (3 rows): its fresh rows, then its replayed row
        kinds = [k in update.replay_keys for k in meta.keys]
        assert kinds == [False, False, True] * 4
        assert [t.get("is_replay", False) for t in meta.tags] == kinds
        # every row carries every field the update will read (the worker reads meta.fields)
        data = tq.kv_batch_get(keys=meta.keys, partition_id=PID, select_fields=meta.fields)
        assert "uid" not in meta.fields and "raw_prompt" not in meta.fields  # a replayed row claims no prompt
        assert {REPLAY_MASK_KEY, STORED_LOG_PROBS_KEY, *NORMALIZER_KEYS} <= set(meta.fields)
        assert data[REPLAY_MASK_KEY].tolist() == [float(k) for k in kinds]
        row = meta.keys.index(update.replay_keys[1])  # stored(1): prompt [7, 9], response [51, 51]
        assert data["input_ids"][row].tolist() == [7, 9, 51, 51]
        assert data["position_ids"][row].tolist() == [0, 1, 2, 3]
        assert data["old_log_probs"][row].float().tolist() == [-2.0, -2.0]
        assert data[STORED_LOG_PROBS_KEY][row].tolist() == [-2.0, -2.0]
        assert data["advantages"][row].tolist() == [0.0, 0.0] and data["ref_log_prob"][row].float().tolist() == [0.0, 0.0]
        fresh = meta.keys.index(batch.keys[0])
        assert data[STORED_LOG_PROBS_KEY][fresh].tolist() == pytest.approx([-0.25, -0.25])  # rollout log-probs
        # normalisers: the same on every row of a mini-batch (rank-major layout), summed over ranks
        replay_tokens = data["replay_tokens_in_minibatch"].tolist()
        assert replay_tokens[0:3] == [replay_tokens[0]] * 3 and replay_tokens[0] == 1 + 3  # rows 0 and 2
        assert data["fresh_seqs_in_minibatch"].tolist() == [4.0] * 12
    assert sorted(tq.keys()) == sorted(batch.keys)  # the replayed rows are gone
    # only what the plan needs was read: one whole row for the layout, selected fields otherwise
    full_reads = [c for c in tq.calls if c[0] == "get" and c[2] is None]
    assert [c[1] for c in full_reads] == [1]

    metrics = store_fresh_rows(tq, batch, update, method, step=3)
    assert metrics == {"stored": 4.0} and method.rejected == 4  # rewards 1 on odd rows
    first = method.pushed[0]
    assert first.uid == "g0" and first.prompt_ids.tolist() == [11, 11, 12] and first.response_ids.tolist() == [101] * 3
    assert first.logprobs.tolist() == pytest.approx([-0.26] * 3) and first.reward == 1.0 and first.step == 3
    assert first.tags["prompt_len"] == P
    token_read = [c for c in tq.calls if c[0] == "get"][-1]
    assert token_read[1] == 4 and set(token_read[2]) == {"prompts", "responses", "response_mask", "uid"}


def test_a_field_the_codec_cannot_rebuild_is_refused_and_nothing_is_left_behind():
    tq = FakeTransferQueue()
    batch = fresh_step(tq, extra={"routed_experts": jagged([[1, 2, 3, 4, 5]] * 8, torch.int64)})
    method = ListStore([stored(i, 2) for i in range(4)], replay_rows=4)
    with pytest.raises(NotImplementedError, match="routed_experts"):
        with replay_at_update(tq, batch, method, UpdateShape(8, 4, 2, 1), shuffle=False):
            pass
    assert sorted(tq.keys()) == sorted(batch.keys)


def test_no_stored_rows_keeps_the_batch_and_writes_the_loss_fields():
    tq = FakeTransferQueue()
    batch = fresh_step(tq)
    with replay_at_update(tq, batch, ListStore([], replay_rows=4), UpdateShape(8, 4, 2, 1), shuffle=False) as update:
        assert update.meta.keys == batch.keys and update.replay_keys == [] and update.minibatch_rows == 4
        assert "uid" in update.meta.fields and REPLAY_MASK_KEY in update.meta.fields
        assert tq.kv_batch_get(keys=batch.keys, partition_id=PID, select_fields=[REPLAY_MASK_KEY])[REPLAY_MASK_KEY].sum() == 0


def test_drawn_rows_the_layout_cannot_place_are_reported_not_dropped_quietly(caplog):
    tq = FakeTransferQueue()
    batch = fresh_step(tq)
    # 3 stored rows, 2 mini-batches x dp 2: one row per rank and mini-batch needs 4, so none is placed,
    # and that is said in one warning line
    method = ListStore([stored(i, 2) for i in range(3)], replay_rows=4)
    with caplog.at_level("WARNING", logger="dyjr_verl.replay.update_strategy"):
        with replay_at_update(tq, batch, method, UpdateShape(8, 4, 2, 1), shuffle=False) as update:
            assert len(update.drawn) == 0 and update.placement.target_rows == 4
    warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warned) == 1 and "gave 3 of the 4 planned replay rows" in warned[0] and "(2 x 2 rows) place 0" in warned[0]
    caplog.clear()
    tq = FakeTransferQueue()
    batch = fresh_step(tq)
    with caplog.at_level("WARNING", logger="dyjr_verl.replay.update_strategy"):  # enough rows: nothing to say
        with replay_at_update(tq, batch, ListStore([stored(i, 2) for i in range(4)], replay_rows=4),
                              UpdateShape(8, 4, 2, 1), shuffle=False) as update:
            assert len(update.drawn) == 4
    assert not [r for r in caplog.records if r.levelname == "WARNING"]


def test_temporary_rows_are_cleared_when_the_block_fails():
    tq = FakeTransferQueue()
    td = TensorDict({"x": torch.arange(3)}, batch_size=[3])
    with pytest.raises(RuntimeError):
        with temporary_rows(tq, PID, td, [{}] * 3, prefix="cand") as keys:
            assert len(tq.keys()) == 3 and all(k.startswith("cand") and k.endswith("_0") for k in keys)
            raise RuntimeError("forward failed")
    assert tq.keys() == []


def test_group_rows_join_their_group_under_fresh_keys_and_leave_after_the_step():
    tq = FakeTransferQueue()
    batch = fresh_step(tq, n=4)
    step = read_groups(tq, batch)
    assert list(step.groups) == ["g0", "g1"] and step.groups["g1"].keys == ["g1_0_0", "g1_1_0"]
    assert step.groups["g0"].question != step.groups["g1"].question
    like = tq.kv_batch_get(keys=batch.keys[:1], partition_id=PID, select_fields=[
        "prompts", "responses", "response_mask", "input_ids", "position_ids", "rollout_log_probs", "rm_scores",
        "dummy_tensor", "uid", "raw_prompt", "data_source"])
    template = {k: (like.get(k)[0] if isinstance(like.get(k), torch.Tensor) else like.get(k).tolist()[0]) for k in like.keys()}
    row, tag = make_replay_row(template, batch.tags[0], [9, 9], score=1.0, session_id=2,
                               rollout_log_probs=torch.tensor([-0.1, -0.2]))
    write_group_rows(tq, step, [row], [tag], [], [], like=like, prefix="exgrpo")
    (key,) = step.replay_keys
    assert key.startswith("exgrpo") and key.split("_")[0] not in step.groups  # never a prompt uid
    got = tq.kv_batch_get(keys=[key], partition_id=PID, select_fields=["uid", "responses", "rm_scores"])
    assert td_column(got, "uid") == ["g0"] and got["responses"][0].tolist() == [9, 9]  # in g0's GRPO group
    assert got["rm_scores"][0].tolist() == [0.0, 1.0] and tq.tags[(PID, key)]["is_replay"] is True
    enlarged = KVBatchMeta(partition_id=PID, keys=batch.keys + [key], tags=batch.tags + [tag])
    after = remove_group_rows(tq, enlarged, step)
    assert after.keys == batch.keys and sorted(tq.keys()) == sorted(batch.keys)


def test_stored_rows_are_private_copies():
    values = torch.arange(6)
    traj = Trajectory(prompt_ids=values[:2], response_ids=values[2:5], response_mask=torch.ones(3), logprobs=torch.zeros(3),
                      reward=1.0, uid="u", step=1)
    values.add_(100)
    assert traj.prompt_ids.tolist() == [0, 1] and traj.response_ids.tolist() == [2, 3, 4]
    assert not np.shares_memory(traj.response_ids, values.numpy())


def test_a_spec_unpickled_in_a_fresh_process_registers_its_term():
    """The loss spec reaches verl's workers pickled; a method's term must be found there without the
    method's module having been imported (Ex-GRPO's shaped_pg)."""
    import pickle
    import subprocess
    import sys

    import dyjr_verl.methods.exgrpo.loss  # noqa: F401  (registers shaped_pg here, on the "driver")
    from dyjr_verl.replay.terms import ReplayLossSpec

    blob = pickle.dumps(ReplayLossSpec(kind="shaped_pg"))
    code = ("import pickle, sys; spec = pickle.loads(sys.stdin.buffer.read()); "
            "print(spec.term.needs_advantages, spec.resolved_normalizer)")
    out = subprocess.run([sys.executable, "-c", code], input=blob, capture_output=True, timeout=300)
    assert out.returncode == 0, out.stderr.decode()[-2000:]
    assert out.stdout.decode().split() == ["True", "joint"]


# -- a method's per-row record (DyJR's top-k record, issue 14) ------------------------------------------


K = 2


def probe_record_fields(n: int = 8) -> dict:
    """The old-log-prob probe's record outputs as verl writes them: per packed position (prompt +
    response) of every row, int32 ids and bf16 log-probs; row i's values are 10 * i + position."""
    from dyjr_verl.diagnostics.topk_record import TOPK_RECORD_PREFIX

    seq = [P + 2 + i % 3 for i in range(n)]
    out = {f"{TOPK_RECORD_PREFIX}id{j}": jagged([[10 * i + t + j for t in range(s)] for i, s in enumerate(seq)],
                                                torch.int32) for j in range(K)}
    out.update({f"{TOPK_RECORD_PREFIX}logp{j}": jagged([[-1.0 - j] * s for s in seq], torch.bfloat16)
                for j in range(K)})
    out[f"{TOPK_RECORD_PREFIX}log_rest"] = jagged([[-2.0 - i] * s for i, s in enumerate(seq)], torch.bfloat16)
    return out


class RecordStore(ListStore):
    """ListStore with DyJR's top-k record hooks (dyjr_verl.methods.dyjr.trainer.DyJRTrainer's)."""

    def record_read_fields(self):
        from dyjr_verl.methods.dyjr.topk import record_read_fields

        return record_read_fields(K)

    def take_records(self, data):
        from dyjr_verl.methods.dyjr.topk import take_record

        return take_record(data, K)

    def record_fields(self, records):
        from dyjr_verl.methods.dyjr.topk import record_fields

        return record_fields(records)

    def dropped_field(self, name):
        from dyjr_verl.diagnostics.topk_record import TOPK_RECORD_PREFIX

        return name.startswith(TOPK_RECORD_PREFIX)


def stored_with_record(i: int, length: int) -> Trajectory:
    from dyjr_verl.diagnostics.topk_record import TopKRecord

    t = stored(i, length)
    t.record = TopKRecord(torch.full((length, K), 7 + i, dtype=torch.int32),
                          torch.full((length, K), -0.5, dtype=torch.bfloat16), torch.full((length,), -3.0, dtype=torch.bfloat16))
    return t


def test_a_record_is_written_on_replayed_rows_only_and_read_for_admitted_rows_only():
    from dyjr_verl.diagnostics.topk_record import TOPK_RECORD_PREFIX
    from dyjr_verl.methods.dyjr.topk import RECORD_FIELDS, TOPK_IDS_KEY

    tq = FakeTransferQueue()
    batch = fresh_step(tq, extra=probe_record_fields())
    method = RecordStore([stored_with_record(i, 1 + i) for i in range(4)], replay_rows=4)
    with replay_at_update(tq, batch, method, UpdateShape(8, 4, 2, 1), shuffle=False) as update:
        meta = update.meta
        # the step's rows: no record read at the update (fresh rows never use it)
        step_reads = [c for c in tq.calls if c[0] == "get" and c[1] == 8]
        assert step_reads and not any(name.startswith(TOPK_RECORD_PREFIX) for c in step_reads for name in c[2])
        (put,) = [c for c in tq.calls if c[0] == "put" and c[1] == 12]
        assert set(RECORD_FIELDS) <= set(put[2]) and set(RECORD_FIELDS) <= set(meta.fields)
        for key in meta.keys:
            row = tq.rows[(PID, key)]
            if key in update.replay_keys:  # its stored record, at its response length
                traj = update.drawn[update.replay_keys.index(key)]
                assert torch.equal(row[TOPK_IDS_KEY], traj.record.ids)
            else:  # a fresh row carries no record values
                assert all(row[name].numel() == 0 for name in RECORD_FIELDS), key
        # verl's worker reads every field of meta.fields for every row: that works
        data = tq.kv_batch_get(keys=meta.keys, partition_id=PID, select_fields=meta.fields)
        assert data[TOPK_IDS_KEY].is_nested and data[TOPK_IDS_KEY].offsets().diff().sum() == sum(range(1, 5))
    before = len(tq.calls)
    store_fresh_rows(tq, batch, update, method, step=3)
    (read,) = [c for c in tq.calls[before:] if c[0] == "get"]
    assert read[1] == 4 and {f"{TOPK_RECORD_PREFIX}id0", f"{TOPK_RECORD_PREFIX}log_rest"} <= set(read[2])
    first = method.pushed[0]  # row 1 (reward 1): prompt 3 + response 3 tokens, response scored at 2..4
    assert first.record.ids.dtype == torch.int32 and first.record.ids.shape == (3, K)
    assert first.record.ids[:, 0].tolist() == [10 + 2, 10 + 3, 10 + 4]
    assert first.record.log_rest.float().tolist() == [-3.0] * 3
    assert first.record.ids.untyped_storage().nbytes() == first.record.ids.nbytes  # a private copy
