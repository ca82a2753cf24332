"""The replay store beside verl's checkpoint: round trip, and one clear line for a state the store
cannot read (DyJR's buffer before compact stored rows)."""

from __future__ import annotations

import pickle

import numpy as np
import pytest

from dyjr_verl.methods.dyjr.buffer import TimeSensitiveBuffer, Trajectory, buffer_digest
from dyjr_verl.methods.dyjr.config import BufferConfig
from dyjr_verl.replay.checkpoint import (
    BUFFER_CKPT_NAME, ReplayStateError, check_fingerprint, load_replay_state, restore_store, save_replay_state,
)


def _buffer() -> TimeSensitiveBuffer:
    b = TimeSensitiveBuffer(BufferConfig(admit="all"))
    b.push(1, [Trajectory([1, 2], [3, 4], [1, 1], [-0.5, -0.6], 1.0, "u", 1, tags={"prompt_len": 2})])
    return b


def test_round_trip_through_the_checkpoint_folder(tmp_path):
    b = _buffer()
    rng = np.random.default_rng(3)
    path = save_replay_state(str(tmp_path), {"store": b.state_dict(), "rng": rng.bit_generator.state})
    assert path.endswith(BUFFER_CKPT_NAME)
    got_path, state = load_replay_state(str(tmp_path))
    fresh = TimeSensitiveBuffer(BufferConfig(admit="all"))
    restore_store(fresh, state, got_path)
    assert list(fresh) == list(b) and buffer_digest(fresh.state_dict()) == buffer_digest(b.state_dict())
    assert load_replay_state(str(tmp_path / "missing")) == (str(tmp_path / "missing" / BUFFER_CKPT_NAME), None)


def test_an_old_buffer_state_is_one_clear_line(tmp_path):
    old = _buffer().state_dict()
    old["version"] = 1  # written before compact rows: entries held a payload of every field
    for _, items in old["blocks"]:
        for t in items:
            t["payload"] = t.pop("tags")
            t.pop("record")
    with open(tmp_path / BUFFER_CKPT_NAME, "wb") as f:
        pickle.dump({"store": old, "rng": None}, f)
    path, state = load_replay_state(str(tmp_path))
    with pytest.raises(ReplayStateError) as info:
        restore_store(TimeSensitiveBuffer(BufferConfig()), state, path)
    message = str(info.value)
    assert "\n" not in message and BUFFER_CKPT_NAME in message and "version 1" in message
    assert "move the file away" in message


def test_a_file_that_is_not_a_replay_state_is_refused(tmp_path):
    with open(tmp_path / BUFFER_CKPT_NAME, "wb") as f:
        pickle.dump([1, 2], f)
    with pytest.raises(ReplayStateError, match="not a replay-state file"):
        load_replay_state(str(tmp_path))


def test_fingerprints_are_compared_key_by_key():
    current = {"method": "dyjr", "record_k": 8}
    check_fingerprint({"store": {}, "fingerprint": dict(current)}, current, "p.pkl", "do X")  # equal: accepted
    with pytest.raises(ReplayStateError) as info:
        saved = {"method": "dyjr", "record_k": 0, "old": 1}
        check_fingerprint({"store": {}, "fingerprint": saved}, current, "p.pkl", "do X")
    assert str(info.value) == ("p.pkl was saved with other replay settings "
                               "(old: saved 1, now absent; record_k: saved 0, now 8): do X")
    with pytest.raises(ReplayStateError, match="no compatibility fingerprint"):
        check_fingerprint({"store": {}}, current, "p.pkl", "do X")
