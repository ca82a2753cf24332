"""Issue 14: DyJR's buffer bytes and capacity as ``plan`` computes them (the paper-scale table in
benchmarks/plan_paper_scale.md comes from the same code), checked against a measured tiny step."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from dyjr_verl.plan import build_plan, compose, render, stored_row_bytes

REPO = Path(__file__).resolve().parents[3]
PAPER_SCALE = [  # 512 prompts x 16 rollouts at 8 x 8 GPUs, as benchmarks/plan_paper_scale.py
    "trainer.nnodes=8", "trainer.n_gpus_per_node=8", "data.train_batch_size=512", "actor_rollout_ref.rollout.n=16",
    "actor_rollout_ref.actor.ppo_mini_batch_size=64", "actor_rollout_ref.actor.use_dynamic_bsz=false",
    "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=4",
    "actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu=4",
]


def _benchmark():
    spec = importlib.util.spec_from_file_location("plan_paper_scale", REPO / "benchmarks" / "plan_paper_scale.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("k", [0, 8])
def test_the_estimate_is_the_measured_bytes_of_a_tiny_step(k):
    """The benchmark's measured row: real probe outputs, take_record, compact trajectories, buffer."""
    measured = _benchmark().measure_tiny_store(k)
    assert measured["rows"] == 32 and measured["measured"] == measured["estimated"] > 0


def test_plan_derives_the_capacity_and_counts_the_record_once_per_admitted_token(tmp_path):
    files = [tmp_path / "train.parquet", tmp_path / "test.parquet"]
    for f in files:
        f.write_bytes(b"")
    overrides = [f"data.train_files={files[0]}", f"data.val_files={files[1]}", *PAPER_SCALE,
                 "dyjr.js.estimator=topk", "dyjr.js.topk_k=8"]
    plan = build_plan(compose("dyjr_math", overrides))
    rows, prompt, response, record = 512 * 16, 1024, 3072, 6 * 8 + 2
    assert plan.buffer_capacity == 4 * rows  # dyjr.buffer.capacity=null: max_age (4) x rollouts per step
    row = stored_row_bytes(prompt, response, 8)
    assert row == prompt * 8 + response * (8 + 8 + 4 + record)  # ids, mask, log-prob, record at the response length
    assert plan.buffer_bytes_per_step == rows * row and plan.buffer_bytes_max == 4 * rows * row
    assert plan.topk_record_bytes_per_step == rows * response * record
    assert plan.topk_probe_bytes_per_step == rows * (prompt + response) * record  # int32 ids + bf16 (6k + 2)
    assert plan.topk_replay_bytes_per_step == plan.replay_rows_per_step * response * record
    assert f"({4 * rows} rows)" in render(plan, "dyjr_math")
    assert any(f"capacity=null: {4 * rows} rows = 4 x {rows}" in note for note in plan.notes)
    assert not any("may never bind" in w for w in plan.warnings)
    explicit = build_plan(compose("dyjr_math", overrides + [f"dyjr.buffer.capacity={rows}"]))
    assert explicit.buffer_capacity == rows and any("may never bind" in w for w in explicit.warnings)
