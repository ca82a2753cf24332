"""The replay state through verl 0.9.1's own ``_save_checkpoint`` / ``_load_checkpoint`` (v1 trainer).

verl's trainer ``__init__`` (Ray, worker groups) and its actor workers (a model) cannot run in a unit
test; everything else is real: our trainers' ``__init__``, verl's checkpoint methods, verl's
completion marker, verl's rotation (``BaseCheckpointManager``) and upload (``verl.utils.hdfs_io``),
a stateful data loader. The actor worker group is a stand-in that does, around a fake shard, what
verl's checkpoint managers do with the folder it is given (rotate, upload) and records what was on
disk when verl called it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from omegaconf import OmegaConf
from torchdata.stateful_dataloader import StatefulDataLoader
from verl.trainer.ppo.checkpoint_callback import CheckpointCallback
from verl.trainer.ppo.v1.trainer_sync import PPOTrainerSync
from verl.utils import hdfs_io
from verl.utils.checkpoint.checkpoint_manager import BaseCheckpointManager, get_checkpoint_tracker_filename
from verl.utils.fs import local_mkdir_safe

from dyjr_verl.methods.dyjr.buffer import buffer_digest
from dyjr_verl.methods.dyjr.trainer import DyJRTrainer
from dyjr_verl.methods.exgrpo.trainer import ExGRPOTrainer
from dyjr_verl.methods.rlep.trainer import RLEPTrainer
from dyjr_verl.replay.checkpoint import BUFFER_CKPT_NAME, FINGERPRINT_NAME, ReplayStateError, load_replay_state
from dyjr_verl.replay.rows import Trajectory
from dyjr_verl.replay.update_strategy import UpdateReplayMethod

SHARD = "model_world_size_1_rank_0.pt"


class ActorGroup:
    """Stand-in for verl's actor worker group (see the module docstring)."""

    def __init__(self, tracker: str):
        self.tracker = tracker
        self.manager = BaseCheckpointManager.__new__(BaseCheckpointManager)  # its __init__ needs torch.distributed
        self.manager.previous_saved_paths = []
        self.seen: list[dict] = []
        self.loaded: list[str] = []

    def save_checkpoint(self, local_path, hdfs_path=None, global_step=0, max_ckpt_to_keep=None):
        self.seen.append({"state": os.path.exists(os.path.join(local_path, BUFFER_CKPT_NAME)),
                          "marker": open(self.tracker).read() if os.path.exists(self.tracker) else None})
        self.manager.ensure_checkpoint_capacity(max_ckpt_to_keep)  # as FSDP's / Megatron's managers
        Path(local_mkdir_safe(local_path), SHARD).write_text(str(global_step))
        if hdfs_path is not None:  # Megatron's manager: the whole actor folder (FSDP's uploads nothing)
            hdfs_io.makedirs(hdfs_path, exist_ok=True)
            hdfs_io.copy(src=local_path, dst=hdfs_path, dirs_exist_ok=True)
        self.manager.register_checkpoint(local_path, max_ckpt_to_keep)

    def load_checkpoint(self, local_path, hdfs_path=None, del_local_after_load=False):
        assert os.path.exists(os.path.join(local_path, SHARD)), local_path
        self.loaded.append(local_path)


class FailingCallback(CheckpointCallback):
    """Dies where verl calls it: right after writing latest_checkpointed_iteration.txt."""

    def on_save(self, trainer, global_step, checkpoint_dir, async_save=False, **kwargs):
        raise KeyboardInterrupt("killed after verl's completion marker")


def _config(root: Path, method: str = "dyjr", node: dict | None = None, **trainer) -> dict:
    return {
        method: node if node is not None else {"buffer": {"admit": "all"}},
        "data": {"seed": 0, "max_response_length": 8},
        "actor_rollout_ref": {"rollout": {"seed": 42, "n": 2}, "actor": {"checkpoint": {"async_save": False}}},
        "trainer": {"default_local_dir": str(root / "ckpt"), "default_hdfs_dir": None, "max_actor_ckpt_to_keep": None,
                    "resume_mode": "auto", "resume_from_path": None, "del_local_ckpt_after_load": False, **trainer},
    }


@pytest.fixture
def make_trainer(monkeypatch):
    """A trainer through our real ``__init__``; verl's (Ray, workers) replaced by what it would set."""

    def verl_init(self, config):
        self.config = config
        self.use_critic = False

    monkeypatch.setattr(PPOTrainerSync, "__init__", verl_init)

    def make(config: dict, cls=DyJRTrainer, callback: type = CheckpointCallback):
        t = cls(OmegaConf.create(config))
        t.actor_rollout_wg = ActorGroup(get_checkpoint_tracker_filename(t.config.trainer.default_local_dir))
        t.train_dataloader = StatefulDataLoader(list(range(8)), batch_size=2)
        t.checkpoint_callback = callback(config=t.config)
        t.global_steps = 0
        return t

    return make


def _fill(t: DyJRTrainer, step: int) -> None:
    t.store.advance(step)
    t.store.push(step, [Trajectory([1, 2], [step, 3 + i], [1, 1], [-0.5, -0.6], 1.0, f"u{step}", step,
                                   tags={"prompt_len": 2}) for i in range(2)])


def _save(t: DyJRTrainer, step: int) -> None:
    t.global_steps = step
    _fill(t, step)
    t._save_checkpoint()


def test_state_is_in_the_actor_folder_before_verls_completion_marker(make_trainer, tmp_path):
    t = make_trainer(_config(tmp_path))
    _save(t, 1)
    _save(t, 2)
    # when verl saved the actor, our state was already there and the marker still named the previous step
    assert t.actor_rollout_wg.seen == [{"state": True, "marker": None}, {"state": True, "marker": "1"}]
    assert (tmp_path / "ckpt" / "latest_checkpointed_iteration.txt").read_text() == "2"
    assert (tmp_path / "ckpt" / "global_step_2" / "actor" / BUFFER_CKPT_NAME).is_file()


def test_a_crash_right_after_verls_marker_resumes_with_the_buffer(make_trainer, tmp_path):
    t = make_trainer(_config(tmp_path), callback=FailingCallback)
    _fill(t, 1)
    t.global_steps = 2
    _fill(t, 2)
    with pytest.raises(KeyboardInterrupt):
        t._save_checkpoint()
    saved = buffer_digest(t.store.state_dict())
    draws = t._replay_rng.random(3)

    resumed = make_trainer(_config(tmp_path))
    resumed._load_checkpoint()
    assert resumed.global_steps == 2 and resumed.actor_rollout_wg.loaded[-1].endswith("global_step_2/actor")
    assert len(resumed.store) == 4 and buffer_digest(resumed.store.state_dict()) == saved
    assert np.array_equal(resumed._replay_rng.random(3), draws)  # the replay stream continues


def test_verls_rotation_removes_the_state_with_the_actor_folder(make_trainer, tmp_path):
    t = make_trainer(_config(tmp_path, max_actor_ckpt_to_keep=2))
    for step in (1, 2, 3):
        _save(t, step)
    ckpt = tmp_path / "ckpt"
    assert sorted(p.relative_to(ckpt).as_posix() for p in ckpt.rglob(BUFFER_CKPT_NAME)) == [
        f"global_step_{s}/actor/{BUFFER_CKPT_NAME}" for s in (2, 3)]
    assert not (ckpt / "global_step_1" / "actor").exists()


def test_the_state_travels_with_the_actor_folder_to_default_hdfs_dir(make_trainer, tmp_path):
    t = make_trainer(_config(tmp_path, default_hdfs_dir=str(tmp_path / "remote")))
    _save(t, 1)
    copied = tmp_path / "remote" / "global_step_1" / "actor" / BUFFER_CKPT_NAME
    assert copied.read_bytes() == (tmp_path / "ckpt" / "global_step_1" / "actor" / BUFFER_CKPT_NAME).read_bytes()


def _one_line(info: pytest.ExceptionInfo) -> str:
    message = str(info.value)
    assert "\n" not in message and BUFFER_CKPT_NAME in message
    return message


@pytest.mark.parametrize("changed, difference", [
    ({"js": {"estimator": "topk", "topk_k": 4}}, "record_k: saved 0, now 4"),
    ({"buffer": {"logprobs": "old"}}, "stored_log_probs: saved 'rollout_log_probs', now 'old_log_probs'"),
    ({"replay": {"as_pg": True}}, "admitted_fields: saved [], now ['advantages']"),
])
def test_a_resume_with_another_row_layout_is_refused_at_load(make_trainer, tmp_path, changed, difference):
    _save(make_trainer(_config(tmp_path)), 1)
    with pytest.raises(ReplayStateError) as info:
        make_trainer(_config(tmp_path, node={"buffer": {"admit": "all"}, **changed}))._load_checkpoint()
    message = _one_line(info)
    assert f"({difference}): resume with the settings it was saved with" in message  # only what differs
    assert "dyjr.replay.resume_empty=true" in message


def test_settings_the_store_reapplies_may_change_on_resume(make_trainer, tmp_path):
    _save(make_trainer(_config(tmp_path)), 1)
    resumed = make_trainer(_config(tmp_path, node={"buffer": {"admit": "all", "max_age": 2, "capacity": 1},
                                                   "js": {"coef": 0.3}, "replay": {"size": 4}}))
    resumed._load_checkpoint()
    assert len(resumed.store) == 1  # the smaller capacity applies


def test_a_resume_with_another_method_is_refused_at_load(make_trainer, tmp_path):
    _save(make_trainer(_config(tmp_path)), 1)
    with pytest.raises(ReplayStateError) as info:
        make_trainer(_config(tmp_path, method="rlep", node={"enable": False}), cls=RLEPTrainer)._load_checkpoint()
    message = _one_line(info)
    assert "method: saved 'dyjr', now 'rlep'" in message
    assert "store: saved 'TimeSensitiveBuffer', now 'RLEPPool'" in message
    assert "rlep.resume_empty=true" in message


def test_a_resume_without_replay_state_is_refused_unless_allowed(make_trainer, tmp_path):
    _save(make_trainer(_config(tmp_path)), 1)
    (tmp_path / "ckpt" / "global_step_1" / "actor" / BUFFER_CKPT_NAME).unlink()
    with pytest.raises(ReplayStateError) as info:
        make_trainer(_config(tmp_path))._load_checkpoint()
    assert "does not exist" in _one_line(info) and "dyjr.replay.resume_empty=true" in str(info.value)

    allowed = make_trainer(_config(tmp_path, node={"buffer": {"admit": "all"}, "replay": {"resume_empty": True}}))
    allowed._load_checkpoint()
    assert allowed.global_steps == 1 and len(allowed.store) == 0


def test_the_fingerprint_is_saved_beside_the_state_as_json(make_trainer, tmp_path):
    t = make_trainer(_config(tmp_path, node={"buffer": {"admit": "all"}, "js": {"estimator": "topk", "topk_k": 4}}))
    _save(t, 1)
    actor = tmp_path / "ckpt" / "global_step_1" / "actor"
    _, state = load_replay_state(str(actor))
    assert json.loads((actor / FINGERPRINT_NAME).read_text()) == {"fingerprint": state["fingerprint"]}
    assert state["fingerprint"]["record_k"] == 4


@pytest.mark.parametrize("method, node, cls", [
    ("dyjr", {"buffer": {"admit": "all"}}, DyJRTrainer),
    ("dyjr", {"enable": False, "js": {"estimator": "topk", "topk_k": 4}}, DyJRTrainer),
    ("dyjr", {"js": {"estimator": "topk", "topk_k": 4}, "buffer": {"logprobs": "old"}}, DyJRTrainer),
    ("dyjr", {"replay": {"as_pg": True}}, DyJRTrainer),
    ("rlep", {"enable": False}, RLEPTrainer),
    ("exgrpo", {}, ExGRPOTrainer),
    ("exgrpo", {"pool": {"logprobs": "rollout"}}, ExGRPOTrainer),
])
def test_the_config_fingerprint_is_what_the_trainer_stores_and_reads(make_trainer, tmp_path, method, node, cls):
    """The start-up check computes the fingerprint from the config alone: it must describe the rows
    the trainer really stores (its store, top-k record, admitted values, stored log-prob field)."""
    t = make_trainer(_config(tmp_path, method=method, node=node), cls=cls)
    fingerprint = t.state_fingerprint()
    assert fingerprint == t.method_config.replay_fingerprint()
    assert fingerprint["method"] == t.config_node and fingerprint["store"] == type(t.store).__name__
    assert fingerprint["record_k"] == t.topk_record_k()
    if isinstance(t, UpdateReplayMethod):
        assert fingerprint["admitted_fields"] == sorted(t.admitted_read_fields())
    if isinstance(t, (UpdateReplayMethod, ExGRPOTrainer)):  # the methods that store log-probs
        assert fingerprint["stored_log_probs"] == t.recorded_log_probs_key()
