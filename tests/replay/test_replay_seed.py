"""The replay stream is seeded from the run's seed unless the method's seed is set.

verl 0.9.1 has no ``trainer.seed``: ``data.seed`` (the data shuffle) is its run-level seed, and
``actor_rollout_ref.rollout.seed`` (vLLM sampling, always set) stands in when that is null. Our
trainers' ``__init__`` runs for real; verl's (Ray, worker groups) is replaced by what it would set.
"""

from __future__ import annotations

import numpy as np
import pytest
from omegaconf import OmegaConf
from verl.trainer.ppo.v1.trainer_sync import PPOTrainerSync

from dyjr_verl.methods.dyjr.trainer import DyJRTrainer
from dyjr_verl.methods.exgrpo.trainer import ExGRPOTrainer
from dyjr_verl.methods.rlep.trainer import RLEPTrainer
from dyjr_verl.replay.config import ConfigError, ReplayConfig


@pytest.fixture
def stream(monkeypatch):
    def verl_init(self, config):
        self.config = config
        self.use_critic = False

    monkeypatch.setattr(PPOTrainerSync, "__init__", verl_init)

    def first_draws(cls, node: dict, data_seed, rollout_seed=42) -> list[float]:
        method = cls.config_node
        config = OmegaConf.create({method: node, "data": {"seed": data_seed},
                                   "actor_rollout_ref": {"rollout": {"seed": rollout_seed, "n": 4}}})
        return cls(config)._replay_rng.random(4).tolist()

    return first_draws


def _draws(seed: int) -> list[float]:
    return np.random.default_rng(seed).random(4).tolist()


@pytest.mark.parametrize("cls, node, explicit", [
    (DyJRTrainer, {}, {"replay": {"seed": 3}}),
    (ExGRPOTrainer, {}, {"replay": {"seed": 3}}),
    (RLEPTrainer, {"enable": False}, {"enable": False, "seed": 3}),
])
def test_the_replay_stream_follows_the_run_seed_unless_set(stream, cls, node, explicit):
    assert stream(cls, node, data_seed=7) == _draws(7)
    assert stream(cls, node, data_seed=8) != stream(cls, node, data_seed=7)  # seeds no longer share a stream
    assert stream(cls, node, data_seed=None, rollout_seed=5) == _draws(5)  # verl's data.seed defaults to null
    assert stream(cls, explicit, data_seed=7) == _draws(3)


def test_a_negative_seed_is_one_line():
    with pytest.raises(ConfigError) as info:
        ReplayConfig.from_dict({"seed": -1})
    assert info.value.errors == ["replay.seed must be >= 0, got -1"]
    assert ReplayConfig().seed is None
