"""``dyjr.buffer.logprobs``: which log-prob is stored as each token's l (vLLM's ``rollout_log_probs``
or verl's recomputed ``old_log_probs``), through the real update path (:func:`replay_at_update` and
:func:`store_fresh_rows` with the DyJR trainer's hooks, against the in-memory TransferQueue)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import test_ablation_modes as abl  # the DyJR trainer without verl's trainer, and a fresh step (tests/methods/dyjr)

from dyjr_verl.methods.dyjr.config import DyJRConfig
from dyjr_verl.replay.config import ConfigError
from dyjr_verl.replay.layout import UpdateShape
from dyjr_verl.replay.rows import REPLAY_MASK_KEY, STORED_LOG_PROBS_KEY
from dyjr_verl.replay.update_strategy import replay_at_update, store_fresh_rows
from fake_tq import FakeTransferQueue

SHAPE = UpdateShape(fresh_rows=6, minibatch_rows=6, dp=1, micro=1)
# abl._fresh_step writes both fields on every token: vLLM's -0.3, verl's recomputed -0.5
VALUES = {"rollout": -0.3, "old": -0.5}


def _update(t, tq, step):
    """One step's replay part; returns (stored_log_probs, replay_mask) of every row handed to verl."""
    batch = abl._fresh_step(tq, step)
    t.before_update(step)
    with replay_at_update(tq, batch, t, SHAPE, shuffle=False) as up:
        rows = tq.kv_batch_get(keys=up.meta.keys, partition_id=abl.PID, select_fields=[STORED_LOG_PROBS_KEY, REPLAY_MASK_KEY])
    store_fresh_rows(tq, batch, up, t, step)
    return rows[STORED_LOG_PROBS_KEY].unbind(0), rows[REPLAY_MASK_KEY]


@pytest.mark.parametrize("logprobs", ["rollout", "old"])
def test_the_stored_log_probs_follow_the_setting(logprobs):
    t = abl._trainer(buffer={"logprobs": logprobs}, replay={"size": 2})
    assert t.recorded_log_probs_key() == {"rollout": "rollout_log_probs", "old": "old_log_probs"}[logprobs]
    tq = FakeTransferQueue()
    _update(t, tq, 1)
    stored = list(t.store)
    assert len(stored) == 3  # the correct rows of step 1
    assert all(np.allclose(tr.logprobs, VALUES[logprobs]) for tr in stored)
    # step 2: the replayed rows carry them as the loss's stored_log_probs (fresh rows theirs, unused)
    lps, replay_mask = _update(t, tq, 2)
    assert int((replay_mask > 0.5).sum()) == 2
    assert all(torch.allclose(lp, torch.tensor(VALUES[logprobs])) for lp in lps)


def test_default_is_the_rollouts_log_prob():
    assert DyJRConfig().buffer.logprobs == "rollout"
    assert abl._trainer().recorded_log_probs_key() == "rollout_log_probs"


def test_a_step_without_the_chosen_field_is_an_error_not_a_fallback():
    """(Start-up refuses ``logprobs=rollout`` without ``calculate_log_probs``; were the field missing
    anyway, the update must not silently store the other one.)"""
    t = abl._trainer(replay={"size": 2})
    tq = FakeTransferQueue()
    batch = abl._fresh_step(tq, 1)
    for key in batch.keys:
        del tq.rows[(abl.PID, key)]["rollout_log_probs"]
    with pytest.raises(KeyError, match="no 'rollout_log_probs' field"):
        with replay_at_update(tq, batch, t, SHAPE, shuffle=False):
            pass


def test_bad_value_is_one_line():
    with pytest.raises(ConfigError) as info:
        DyJRConfig.from_dict({"buffer": {"logprobs": "vllm"}})
    assert info.value.errors == ["dyjr.buffer.logprobs must be one of 'rollout', 'old', got 'vllm'"]
