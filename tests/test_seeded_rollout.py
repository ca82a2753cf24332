"""The seeded agent loop (dyjr_verl/seeded_rollout.py): one sampling seed per trajectory, distinct
within a GRPO group and the same for the same data order in any worker. Its effect on real vLLM
rollouts (dp = 1 and dp = 2 sample the same tokens) is checked end to end in test_e2e_dp2.py; here
verl's single-turn loop underneath is replaced by a recorder of the sampling parameters it gets."""

from __future__ import annotations

import asyncio

import pytest
from omegaconf import OmegaConf
from verl.experimental.agent_loop.single_turn_agent_loop import SingleTurnAgentLoop

from dyjr_verl import seeded_rollout
from dyjr_verl.seeded_rollout import SeededSingleTurnAgentLoop, trajectory_seed, write_agent_loop_config

Q1 = [{"role": "user", "content": "Tom has 3 apples and buys 4 more."}]
Q2 = [{"role": "user", "content": "Ann has 5 pears and eats 2."}]


@pytest.fixture
def recorded(monkeypatch):
    seen: list[tuple[str, dict]] = []

    async def fake_run(self, sampling_params, **kwargs):
        seen.append((kwargs["raw_prompt"][0]["content"], dict(sampling_params)))
        return None

    monkeypatch.setattr(SingleTurnAgentLoop, "run", fake_run)
    monkeypatch.setattr(SeededSingleTurnAgentLoop, "draws", seeded_rollout.Counter())  # a fresh worker
    return seen


def _rollouts(prompts, seed=42):
    """What verl's agent-loop worker does per step: one loop object per trajectory, tasks in batch order."""

    async def step():
        tasks = []
        for prompt in prompts:
            loop = object.__new__(SeededSingleTurnAgentLoop)
            loop.rollout_config = OmegaConf.create({"seed": seed})
            tasks.append(asyncio.create_task(loop.run({"temperature": 1.0}, raw_prompt=prompt)))
        await asyncio.gather(*tasks)

    asyncio.run(step())


def test_each_trajectory_of_a_group_gets_its_own_seed(recorded):
    _rollouts([Q1] * 4 + [Q2] * 4)
    seeds = [params["seed"] for _, params in recorded]
    assert len(set(seeds)) == 8  # distinct within and across groups
    assert all(params["temperature"] == 1.0 for _, params in recorded)  # the rest passes through
    assert seeds[:4] == [trajectory_seed(42, seeded_rollout.json.dumps(Q1, sort_keys=True), k) for k in range(4)]
    # the next step continues each question's draw count: a revisited question gets new samples
    _rollouts([Q2] * 4)
    assert not set(p["seed"] for _, p in recorded[8:]) & set(seeds)


def test_the_same_data_order_gives_the_same_seeds_in_a_fresh_worker(recorded, monkeypatch):
    _rollouts([Q1] * 4 + [Q2] * 4)
    first = [p["seed"] for _, p in recorded]
    monkeypatch.setattr(SeededSingleTurnAgentLoop, "draws", seeded_rollout.Counter())
    _rollouts([Q1] * 4 + [Q2] * 4)
    assert [p["seed"] for _, p in recorded[8:]] == first
    _rollouts([Q1], seed=7)  # rollout.seed changes the stream
    assert recorded[-1][1]["seed"] not in first


def test_seed_is_31_bit_and_stable():
    s = trajectory_seed(42, "question", 0)
    assert s == trajectory_seed(42, "question", 0) and 0 <= s < 2**31
    assert len({trajectory_seed(42, "question", k) for k in range(1000)}) == 1000


def test_agent_loop_config_file_names_the_class(tmp_path):
    overrides = write_agent_loop_config(tmp_path)
    [entry] = OmegaConf.load(tmp_path / "agent_loops.yaml")
    assert entry.name == seeded_rollout.AGENT_LOOP_NAME
    assert entry["_target_"] == "dyjr_verl.seeded_rollout.SeededSingleTurnAgentLoop"
    assert overrides == [
        f"actor_rollout_ref.rollout.agent.agent_loop_config_path={tmp_path / 'agent_loops.yaml'}",
        f"actor_rollout_ref.rollout.agent.default_agent_loop={seeded_rollout.AGENT_LOOP_NAME}",
    ]
