"""Miniature reproduction (issue 7) infrastructure, without trainer runs: warm-start cache and
determinism, the launcher's command lines (seeds everywhere, shared settings identical), resumability
with fake processes, and the report from synthetic run records."""

from __future__ import annotations

import gzip
import json
import statistics
from pathlib import Path

import pytest

from dyjr_verl.analysis import report
from dyjr_verl.assets import tasks
from dyjr_verl.assets import warmstart as ws
from dyjr_verl.experiments import commands, mini, process, records
from dyjr_verl.experiments.config import (
    ABLATION_VARIANTS,
    METHODS,
    SharedSettings,
    ablation,
    comparison,
)
from dyjr_verl.experiments.process import ProcResult

TINY_WS = ws.WarmStartSpec(train=24, val=8, test=8, eval_every=2, min_steps=2, max_steps=4, target_greedy=1.1,
                           eval_samples=2, max_new_tokens=8, batch=4)


# ----------------------------------------------------------------------------------------------
# task + warm start
# ----------------------------------------------------------------------------------------------


def test_three_step_problems_are_right_and_default_stream_is_unchanged():
    probs = tasks.arithmetic_problems(300, seed=5, two_step_share=0.4, three_step_share=0.3)
    n_ops = [p.solution.count("=") for p in probs]
    assert {1, 2, 3} <= set(n_ops)
    for p in probs:
        assert p.solution.endswith(f"\\boxed{{{p.answer}}}")
        for seg in p.solution.split(".")[:-1]:  # every step of the chain of thought is right
            lhs, rhs = seg.split("=")
            assert eval(lhs) == int(rhs)
    # the default (and every existing build) never draws the extra random number
    assert tasks.arithmetic_problems(64, seed=0) == tasks.arithmetic_problems(64, seed=0, three_step_share=0.0)
    assert max(p.solution.count("=") for p in tasks.arithmetic_problems(200, seed=0)) == 2


def test_warm_start_is_deterministic_cached_and_splits_validation_from_train(tmp_path, monkeypatch):
    import pandas as pd

    a = ws.warm_start(TINY_WS, tmp_path / "a", progress=lambda s: None)
    b = ws.warm_start(TINY_WS, tmp_path / "b", progress=lambda s: None)
    assert not a.cached and a.steps == 4
    assert (a.root / "tokenizer-model" / "model.safetensors").read_bytes() == \
        (b.root / "tokenizer-model" / "model.safetensors").read_bytes()
    meta = json.loads((a.root / ws.WARMSTART_FILE).read_text())
    assert meta["rows"] == {"train": 16, "val": 8, "test": 8}
    assert set(meta["test"]) >= {"greedy", "pass_at_k", "avg_at_k"} and meta["test"]["k"] == 2
    assert [c["step"] for c in meta["curve"]] == [2, 4]  # the stopping rule read validation only
    q = {s: set(pd.read_parquet(a.root / "arith" / f"{s}.parquet").extra_info.map(lambda e: e["question"]))
         for s in ("train", "val", "test")}
    assert not (q["train"] & q["val"]) and not (q["train"] & q["test"]) and not (q["val"] & q["test"])

    # cache hit: the same settings return at once, without training or generating
    def boom(*args, **kwargs):
        raise AssertionError("a cache hit must not train")

    monkeypatch.setattr(ws, "sft_batches", boom)
    monkeypatch.setattr(ws, "measure", boom)
    again = ws.warm_start(TINY_WS, tmp_path / "a", progress=lambda s: None)
    assert again.cached and again.test == a.test and again.steps == a.steps
    # other settings in the same directory: rebuilt (here: the patched trainer is hit)
    with pytest.raises(AssertionError, match="cache hit"):
        ws.warm_start(ws.WarmStartSpec(**{**TINY_WS.__dict__, "lr": 1e-3}), tmp_path / "a", progress=lambda s: None)


def test_warm_start_key_depends_on_every_setting():
    keys = {ws.WarmStartSpec().key(), ws.WarmStartSpec(seed=1).key(), ws.WarmStartSpec(target_greedy=0.3).key(),
            ws.WarmStartSpec(task="sql").key()}
    assert len(keys) == 4 and ws.WarmStartSpec().key() == ws.WarmStartSpec().key()
    # adding the task setting kept the arithmetic key: the cache and the committed run records
    # (results/mini, fingerprinted by this key) stay valid
    assert ws.WarmStartSpec().key() == "3da7d86b3258"


def test_sql_pool_golds_run_on_the_company_db_and_the_default_questions_are_unchanged(tmp_path):
    import sqlite3

    pool = tasks.sql_question_pool(0)
    questions = [q for q, _ in pool]
    assert len(pool) >= 300 and len(set(questions)) == len(questions)
    assert set(tasks.sql_questions(0)) <= set(pool)  # the default set is a subset; its order is untouched
    assert tasks.sql_questions(0) == tasks.sql_questions(0) and tasks.sql_question_pool(0) == pool
    db = tmp_path / "company.sqlite"
    tasks.build_company_db(db, seed=0)
    con = sqlite3.connect(db)
    try:
        for _, gold in pool:
            con.execute(gold).fetchall()  # every gold query runs
    finally:
        con.close()


def test_sql_warm_start_writes_the_sql_layout_with_rows_pointing_at_its_database(tmp_path):
    import pandas as pd

    spec = ws.WarmStartSpec.for_task("sql", **{k: v for k, v in TINY_WS.__dict__.items() if k != "task"})
    assert spec.task == "sql" and spec.train == TINY_WS.train
    res = ws.warm_start(spec, tmp_path / "sql_ws", progress=lambda s: None)
    meta = json.loads((res.root / ws.WARMSTART_FILE).read_text())
    assert meta["rows"] == {"train": 16, "val": 8, "test": 8} and meta["spec"]["task"] == "sql"
    db = res.root / "sql" / "company.sqlite"
    assert db.is_file() and not list(tmp_path.glob("*.tmp-*"))
    for split in ("train", "val", "test"):
        df = pd.read_parquet(res.root / "sql" / f"{split}.parquet")
        assert set(df.ability) == {"sql"} and {e["db_path"] for e in df.extra_info} == {str(db)}
    # the supervised target of a question scores 1 with the SQL reward, a wrong query does not
    row = pd.read_parquet(res.root / "sql" / "train.parquet").iloc[0].to_dict()
    gold = row["reward_model"]["ground_truth"]
    assert ws._is_correct(tasks.sql_solution(gold), row)
    assert not ws._is_correct(tasks.sql_solution("SELECT name FROM department"), row)
    with pytest.raises(ValueError, match="unknown warm-start task"):
        ws.WarmStartSpec.for_task("chess")
    with pytest.raises(ValueError, match="SQL pool has"):
        ws.warm_start(ws.WarmStartSpec.for_task("sql", train=400), tmp_path / "x", progress=lambda s: None)


# ----------------------------------------------------------------------------------------------
# command lines
# ----------------------------------------------------------------------------------------------


def _overrides(cmd):
    return cmd[cmd.index("--config-name") + 2:]


def test_trainer_commands_seed_everything_and_share_the_settings(tmp_path):
    exp = comparison(tmp_path, list(METHODS), [0, 7], SharedSettings(steps=12))
    recipes = tmp_path / "recipes"
    per_method = {}
    for run in exp.runs:
        cmd = commands.trainer_command(exp, run, run.dir(tmp_path), recipes)
        assert cmd[1:3] == ["-m", "verl.trainer.main_ppo"]
        assert cmd[cmd.index("--config-name") + 1] == f"{run.method}_tiny_cpu"
        ov = _overrides(cmd)
        for key in ("data.seed", "actor_rollout_ref.rollout.seed", "actor_rollout_ref.actor.data_loader_seed",
                    "actor_rollout_ref.actor.fsdp_config.seed", *commands.METHOD_SEED_KEYS[run.method]):
            assert f"{key}={run.seed}" in ov, (run, key)
        assert not any(o.endswith("seed=0") for o in ov) or run.seed == 0  # no stray fixed seed
        assert "trainer.total_training_steps=12" in ov and "trainer.save_freq=12" in ov
        assert "trainer.resume_mode=disable" in ov
        assert f"trainer.default_local_dir={run.dir(tmp_path) / 'checkpoints'}" in ov
        per_method.setdefault(run.seed, {})[run.method] = ov
    for seed, by_method in per_method.items():
        # identical except the method's own seed key, RLEP's pool path and the run's names
        def shared(method, ov, seed=seed):
            own = {f"{k}={seed}" for k in commands.METHOD_SEED_KEYS[method]}
            return [o for o in ov if o not in own and not o.startswith(("rlep.pool_path=", "trainer.default_local_dir=",
                                                                        "trainer.experiment_name="))]
        common = {m: shared(m, ov) for m, ov in by_method.items()}
        assert len({tuple(v) for v in common.values()}) == 1, common
    rlep = next(r for r in exp.runs if r.method == "rlep" and r.seed == 7)
    assert f"rlep.pool_path={commands.rlep_pool_path(rlep.dir(tmp_path))}" in _overrides(
        commands.trainer_command(exp, rlep, rlep.dir(tmp_path), recipes))
    col = commands.collect_command(exp, rlep, rlep.dir(tmp_path), tmp_path / "assets")
    assert col[col.index("--seed") + 1] == "7" and col[col.index("--max-tokens") + 1] == "48"
    assert col[col.index("--data") + 1].endswith("arith/train.parquet")


def test_eval_reads_test_for_the_comparison_and_validation_for_the_ablation(tmp_path):
    shared = SharedSettings(steps=5)
    comp = comparison(tmp_path / "c", ["grpo"], [3], shared)
    abl = ablation(tmp_path / "a", list(ABLATION_VARIANTS), 0, shared)
    run = comp.runs[0]
    cmd = commands.eval_command(comp, run, run.dir(comp.out), tmp_path / "assets")
    assert cmd[cmd.index("--model") + 1].endswith("checkpoints/global_step_5")
    assert cmd[cmd.index("--data") + 1] == f"arith_test={tmp_path / 'assets' / 'arith' / 'test.parquet'}"
    assert cmd[cmd.index("--samples") + 1] == "32" and cmd[cmd.index("--seed") + 1] == "3"
    assert "--rank-k" in cmd
    for r in abl.runs:
        cmd = commands.eval_command(abl, r, r.dir(abl.out), tmp_path / "assets")
        data = cmd[cmd.index("--data") + 1]
        assert data.startswith("arith_val=") and data.endswith("/arith/val.parquet")
        ov = _overrides(commands.trainer_command(abl, r, r.dir(abl.out), tmp_path))
        assert ov[len(ov) - len(r.extra):] == list(r.extra)  # the variant's settings come last: they win
    assert {r.method for r in abl.runs} == {"grpo", "dyjr"}


def test_fingerprint_changes_with_the_settings(tmp_path):
    a = comparison(tmp_path, ["grpo"], [0], SharedSettings(steps=4))
    b = comparison(tmp_path, ["grpo"], [0], SharedSettings(steps=5))
    assert a.fingerprint(a.runs[0]) != b.fingerprint(b.runs[0])
    assert a.fingerprint(a.runs[0]) == comparison(tmp_path, ["grpo"], [0], SharedSettings(steps=4)).fingerprint(a.runs[0])


def test_sql_task_swaps_data_reward_and_lengths_for_every_method_alike(tmp_path):
    exp = mini.experiment_from_args(mini.build_parser().parse_args(
        ["run", "--task", "sql", "--seeds", "1", "--out", str(tmp_path)]))
    assert exp.task == "sql" and exp.warmstart.task == "sql" and exp.shared.max_response_length == 64
    assert exp.fingerprint(exp.runs[0]) != comparison(tmp_path, ["grpo"], [1], SharedSettings()).fingerprint(exp.runs[0])
    assets = tmp_path / "assets"
    for run in exp.runs:
        ov = _overrides(commands.trainer_command(exp, run, run.dir(tmp_path), tmp_path))
        assert "reward.custom_reward_function.path=pkg://dyjr_verl.rewards.sql" in ov
        assert "data.train_files=${dyjr_assets}/sql/train.parquet" in ov and "data.max_response_length=64" in ov
    rlep = next(r for r in exp.runs if r.method == "rlep")
    col = commands.collect_command(exp, rlep, rlep.dir(tmp_path), assets)
    assert col[col.index("--data") + 1] == str(assets / "sql" / "train.parquet")
    assert col[col.index("--reward") + 1] == "pkg://dyjr_verl.rewards.sql"
    ev = commands.eval_command(exp, rlep, rlep.dir(tmp_path), assets)
    assert ev[ev.index("--data") + 1] == f"sql_test={assets / 'sql' / 'test.parquet'}"
    default = mini.experiment_from_args(mini.build_parser().parse_args(["ablation"]))
    assert default.task == "arith" and default.out == Path("results/mini/ablation").resolve()


def test_cli_rejects_bad_input_with_one_line(capsys):
    assert mini.main(["run", "--methods", "grpo", "ppo", "--dry-run"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: unknown method")
    assert mini.main(["run", "--steps", "0", "--dry-run"]) == 2
    assert mini.main(["ablation", "--variants", "nope", "--dry-run"]) == 2


# ----------------------------------------------------------------------------------------------
# resumability, with fake processes
# ----------------------------------------------------------------------------------------------


def _file_log(path: Path, per_step: list[dict]) -> None:
    """Per-step metrics written by verl's own file logger (the trainer's ``file`` backend)."""
    from unittest import mock

    from verl.utils.tracking import FileLogger

    with mock.patch.dict("os.environ", {"VERL_FILE_LOGGER_PATH": str(path)}):
        logger = FileLogger("dyjr_verl", "fake")
    for step, metrics in enumerate(per_step, 1):
        logger.log(metrics, step=step)
    logger.finish()


class FakeProcesses:
    """Stands in for run_logged: writes what the trainer / eval / collection would write. The
    trainer's metrics go to its file logger's JSON lines (``console=True``: to the console only, as
    a trainer without the ``file`` backend; ``truncate``: the JSON lines end mid-record)."""

    def __init__(self, fail_train_for: str | None = None):
        self.calls: list[str] = []
        self.fail_train_for = fail_train_for
        self.console = self.truncate = False

    def __call__(self, cmd, log_path, *, cwd, env, deadline_s):
        assert deadline_s > 0 and env["DYJR_ASSETS_DIR"]
        log_path.write_text("start-up noise\n")
        if "verl.trainer.main_ppo" in cmd:
            label = next(o for o in cmd if o.startswith("trainer.experiment_name=")).split("=")[1]
            self.calls.append(f"train:{label}")
            if label == self.fail_train_for:
                return ProcResult(1, 5.0, None, False)
            steps = int(next(o for o in cmd if o.startswith("trainer.total_training_steps=")).split("=")[1])
            per_step = [{"critic/score/mean": 0.1 * s, "timing_s/step": 20.0 if s == 1 else 3.0,
                         "rank_k/p1": 0.9 - 0.01 * s, "noise/key": 1} for s in range(1, steps + 1)]
            metrics = Path(env["VERL_FILE_LOGGER_PATH"])
            assert metrics == cwd / "metrics.jsonl"  # in the run directory, beside main_ppo.log
            if self.console:
                lines = [f"(TaskRunner pid=1) step:{s} - " + " - ".join(f"{k}:{v}" for k, v in m.items())
                         for s, m in enumerate(per_step, 1)]
                log_path.write_text("start-up noise\n" + "\n".join(lines) + "\n")
            else:
                _file_log(metrics, per_step)
                if self.truncate:
                    with metrics.open("a") as f:
                        f.write('{"step":5,"data":{"critic/sc')
            ckpt = Path(next(o for o in cmd if o.startswith("trainer.default_local_dir=")).split("=")[1])
            (ckpt / f"global_step_{steps}" / "actor" / "huggingface").mkdir(parents=True)
            return ProcResult(0, 100.0 + 3 * steps, 80.0, False)
        if "dyjr_verl.eval" in cmd:
            self.calls.append("eval")
            out = Path(cmd[cmd.index("--out") + 1])
            out.mkdir(parents=True, exist_ok=True)
            rows = [{"benchmark": "b", "index": i, "greedy": i % 2 == 0, "samples": [1] * i + [0] * (32 - i),
                     "distinct_correct": 1} for i in range(4)]
            (out / "scores.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
            (out / "rank_k.json").write_text(json.dumps({"rank_k/p1": 0.8, "rank_k/entropy": 0.5}))
            (out / "generations.jsonl").write_text("{}")
            return ProcResult(0, 30.0, None, False)
        if "dyjr_verl.methods.rlep.collect" in cmd:
            self.calls.append("collect")
            Path(cmd[cmd.index("--out") + 1]).write_text("pool")
            log_path.write_text('rlep_collect: {"pool_questions": 12}\n')
            return ProcResult(0, 40.0, None, False)
        raise AssertionError(cmd)


@pytest.fixture
def fake_env(tmp_path, monkeypatch):
    monkeypatch.setattr(mini, "LOCK_PATH", tmp_path / "e2e.lock")
    monkeypatch.setattr(mini, "ray_stop", lambda *a, **k: None)
    monkeypatch.setattr(mini, "_warm_start", lambda exp, progress: {
        "root": str(tmp_path / "ws"), "key": "k", "steps": 800,
        "val": {"greedy": 0.4}, "test": {"greedy": 0.5, "pass_at_k": 0.8, "k": 8}})
    fake = FakeProcesses()
    monkeypatch.setattr(mini, "run_logged", fake)
    return fake


def test_launcher_skips_finished_runs_and_redoes_partial_ones(tmp_path, fake_env):
    out = tmp_path / "runs"
    exp = comparison(out, ["grpo", "rlep"], [0, 1], SharedSettings(steps=4))
    assert mini.launch(exp, progress=lambda s: None) == 0
    assert fake_env.calls.count("eval") == 4 and fake_env.calls.count("collect") == 2
    rec = json.loads((out / "rlep" / "seed1" / "run.json").read_text())
    assert rec["status"] == "done" and rec["eval"]["greedy"] == 0.5 and rec["eval"]["pass@32"] > rec["eval"]["pass@1"]
    t = rec["timing"]
    assert t["steady_step_s"] == 3.0 and t["steady_steps"] == [2, 3] and t["startup_s"] == 60.0
    assert t["collect_s"] == 40.0 and t["total_wall_s"] == 40.0 + t["train_wall_s"]  # RLEP pays its collection
    assert rec["collect"] == {"pool_questions": 12}
    assert "noise/key" not in rec["steps"]["2"] and rec["steps"]["2"]["rank_k/p1"] == pytest.approx(0.88)
    run_dir = out / "rlep" / "seed1"
    assert not (run_dir / "checkpoints").exists() and not (run_dir / "rlep_pool.parquet").exists()
    assert not (run_dir / "eval" / "generations.jsonl").exists()
    assert rec["steps_source"] == "metrics.jsonl" and sorted(rec["steps"]) == ["1", "2", "3", "4"]
    with gzip.open(run_dir / "metrics.jsonl.gz", "rt") as f:
        assert '"step":4' in f.read()
    assert (run_dir / "main_ppo.log.gz").is_file()

    # second launch: everything finished, nothing runs
    fake_env.calls.clear()
    assert mini.launch(exp, progress=lambda s: None) == 0 and fake_env.calls == []

    # a killed run (no run.json, leftovers) is wiped and redone; the others stay skipped
    (out / "grpo" / "seed1" / "run.json").unlink()
    (out / "grpo" / "seed1" / "leftover").write_text("x")
    assert [s for _, s in mini.plan(exp)].count(records.RunState.PARTIAL) == 1
    assert mini.launch(exp, progress=lambda s: None) == 0
    assert fake_env.calls == ["train:mini_grpo_seed1", "eval"]
    assert not (out / "grpo" / "seed1" / "leftover").exists()

    # other settings: finished runs are stale and refused unless --redo-stale
    exp5 = comparison(out, ["grpo", "rlep"], [0, 1], SharedSettings(steps=5))
    with pytest.raises(mini.MiniError, match="redo-stale"):
        mini.launch(exp5, progress=lambda s: None)


def test_a_failed_run_is_recorded_and_retried(tmp_path, fake_env):
    fake_env.fail_train_for = "mini_dyjr_seed0"
    out = tmp_path / "runs"
    exp = comparison(out, ["grpo", "dyjr"], [0], SharedSettings(steps=2))
    assert mini.launch(exp, progress=lambda s: None) == 1  # the other run still ran
    failed = json.loads((out / "dyjr" / "seed0" / "failed.json").read_text())
    assert failed["stage"] == "main_ppo" and failed["returncode"] == 1
    assert (out / "grpo" / "seed0" / "run.json").is_file() and not (out / "dyjr" / "seed0" / "run.json").exists()
    fake_env.fail_train_for = None
    fake_env.calls.clear()
    assert mini.launch(exp, progress=lambda s: None) == 0 and fake_env.calls == ["train:mini_dyjr_seed0", "eval"]


def test_without_the_file_logger_the_console_log_is_read_with_a_warning(tmp_path, fake_env):
    fake_env.console = True
    out, said = tmp_path / "runs", []
    assert mini.launch(comparison(out, ["grpo"], [0], SharedSettings(steps=3)), progress=said.append) == 0
    assert any("warning: no metrics.jsonl" in s for s in said), said
    rec = json.loads((out / "grpo" / "seed0" / "run.json").read_text())
    assert rec["steps_source"] == "main_ppo.log" and rec["steps"]["3"]["critic/score/mean"] == pytest.approx(0.3)


def test_a_truncated_metrics_file_fails_the_run_naming_the_line(tmp_path, fake_env):
    fake_env.truncate = True
    out = tmp_path / "runs"
    assert mini.launch(comparison(out, ["grpo"], [0], SharedSettings(steps=4)), progress=lambda s: None) == 1
    failed = json.loads((out / "grpo" / "seed0" / "failed.json").read_text())
    assert failed["stage"] == "main_ppo" and "metrics.jsonl:5: not a JSON line" in failed["error"]
    assert fake_env.calls == ["train:mini_grpo_seed0"]  # no evaluation of a run whose metrics are unreadable


def test_dry_run_shows_where_the_metrics_go(tmp_path, capsys):
    assert mini.main(["run", "--methods", "grpo", "--seeds", "0", "--out", str(tmp_path), "--dry-run"]) == 0
    assert f"VERL_FILE_LOGGER_PATH={tmp_path / 'grpo' / 'seed0' / 'metrics.jsonl'} " in capsys.readouterr().out


def test_lock_waits_are_bounded(tmp_path):
    import fcntl
    import os

    lock = tmp_path / "l"
    fd = os.open(lock, os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)  # another "session" holds it
    try:
        with pytest.raises(process.LockTimeout), process.e2e_lock(lock, deadline_s=0.3, poll_s=0.1):
            pass
    finally:
        os.close(fd)
    with process.e2e_lock(lock, deadline_s=1) as waited:
        assert waited < 1


def test_run_logged_kills_at_the_deadline(tmp_path):
    import sys

    res = process.run_logged([sys.executable, "-c", "import time; print('step:1 - a:1', flush=True); time.sleep(60)"],
                             tmp_path / "log", cwd=tmp_path, env={}, deadline_s=2)
    assert res.timed_out and res.returncode == -9 and res.wall_s < 30 and res.first_step_s is not None


def test_steady_steps_and_timing():
    assert records.steady_steps([1, 2, 3, 4, 5]) == [2, 3, 4]
    assert records.steady_steps([1, 2]) == [2] and records.steady_steps([1]) == [1]
    t = records.timing({1: {"timing_s/step": 25.0}, 2: {"timing_s/step": 3.0}, 3: {"timing_s/step": 5.0}}, 115.0)
    assert t["steady_step_s"] == 3.0 and t["startup_s"] == 90.0 and t["train_steps_s"] == 33.0


# ----------------------------------------------------------------------------------------------
# report
# ----------------------------------------------------------------------------------------------

GREEDY = {"grpo": [0.40, 0.44, 0.42], "dyjr": [0.50, 0.46, 0.48], "rlep": [0.41, 0.43, 0.45]}


def _write_runs(root: Path, with_rank_k: bool = True, steps: int = 6, kind: str = "comparison",
                steps_source: str | None = None):
    for method, values in GREEDY.items():
        for seed, g in enumerate(values):
            per_step = {}
            for s in range(1, steps + 1):
                m = {"critic/score/mean": 0.3 + 0.02 * s + 0.01 * seed, "timing_s/step": 3.0}
                if with_rank_k:
                    m.update({"rank_k/p1": 0.8 + 0.01 * s, "rank_k/entropy": 0.6 - 0.01 * s})
                per_step[str(s)] = m
            rec = {"label": method, "method": method, "seed": seed, "kind": kind, "status": "done", "recipe": f"{method}_tiny_cpu",
                   "extra_overrides": [], "shared": {"steps": steps, "max_response_length": 48},
                   "eval_settings": {"split": "test", "samples": 32, "temperature": 1.0},
                   "warmstart": {"key": "abc", "steps": 800, "val": {"greedy": 0.44, "questions": 64},
                                 "test": {"greedy": 0.57, "avg_at_k": 0.4, "pass_at_k": 0.8, "k": 8, "questions": 128}},
                   "eval": {"greedy": g, "avg@8": g - 0.1, "pass@1": g - 0.1, "pass@8": g + 0.3, "pass@32": g + 0.4,
                            "distinct_correct": 2.0 + seed, "rank_k/p1": 0.85, "rank_k/entropy": 0.4},
                   "timing": {"steady_step_s": 3.0 + seed, "total_wall_s": 300.0, "startup_s": 90.0, "eval_wall_s": 60.0,
                              "collect_s": 50.0 if method == "rlep" else 0.0},
                   "steps": per_step}
            if steps_source:
                rec["steps_source"] = steps_source  # absent in records made before the file logger
            d = root / method / f"seed{seed}"
            d.mkdir(parents=True)
            (d / "run.json").write_text(json.dumps(rec))


def test_report_table_plots_and_comparison(tmp_path):
    runs = tmp_path / "runs"
    _write_runs(runs)
    (runs / "exgrpo" / "seed0").mkdir(parents=True)  # a partial run: no record, ignored
    assert report.main(["--runs", str(runs), "--out", str(tmp_path / "out")]) == 0
    md = (tmp_path / "out" / "README.md").read_text()
    g = GREEDY["dyjr"]
    want = f"{100 * statistics.fmean(g):.1f} ± {100 * statistics.stdev(g):.1f}"
    dyjr_row = next(line for line in md.splitlines() if line.startswith("| DyJR |"))
    assert dyjr_row.startswith(f"| DyJR | 3 | {want} |"), dyjr_row  # 48.0 ± 2.0
    assert "| GRPO | 3 | 42.0 ± 2.0 |" in md and "Ex-GRPO" not in md.split("## Results")[1].split("##")[0]
    assert "3.00 ± 1.00" in dyjr_row  # steady step time over seeds
    # DyJR - GRPO greedy = +6 pts = 3x the seed std (2 pts)
    assert "+6 pts (3.0× seed std)" in md
    assert "higher than GRPO by more than the larger seed std on greedy %" in md
    assert "## Reading" in md and "held-out" in md.lower()
    assert "Per-step metrics parsed from verl's console log (records made before the file logger)." in md
    for png in ("accuracy_over_steps.png", "rank1_over_steps.png"):
        p = tmp_path / "out" / png
        assert p.is_file() and p.stat().st_size > 5000 and p.read_bytes()[:4] == b"\x89PNG"
        assert f"]({png})" in md


def test_report_without_rank_k_metrics_and_with_one_seed(tmp_path):
    runs = tmp_path / "runs"
    _write_runs(runs, with_rank_k=False, steps_source="metrics.jsonl")
    for method in GREEDY:
        for seed in (1, 2):
            (runs / method / f"seed{seed}" / "run.json").unlink()
    out = tmp_path / "out"
    (out).mkdir()
    (out / "rank1_over_steps.png").write_bytes(b"stale")
    assert report.main(["--runs", str(runs), "--out", str(out)]) == 0
    md = (out / "README.md").read_text()
    assert "logged no per-step `rank_k/p1`" in md and not (out / "rank1_over_steps.png").exists()
    assert (out / "accuracy_over_steps.png").stat().st_size > 5000
    assert "| DyJR | 1 | 50.0 |" in md  # one seed: no ± std
    assert "one seed" in md
    assert "Per-step metrics from verl's file logger (`metrics.jsonl`)." in md


def test_report_ablation_section_and_errors(tmp_path, capsys):
    runs, abl = tmp_path / "runs", tmp_path / "ablation"
    _write_runs(runs)
    _write_runs(abl, kind="ablation")
    assert report.main(["--runs", str(runs), "--out", str(tmp_path / "out")]) == 0  # finds ../ablation
    md = (tmp_path / "out" / "README.md").read_text()
    assert "## DyJR ablation (validation slice)" in md and "Difference to the DyJR default" in md
    assert report.main(["--runs", str(tmp_path / "missing"), "--out", str(tmp_path / "o2")]) == 2
    assert capsys.readouterr().err.startswith("error: --runs")
    (tmp_path / "empty").mkdir()
    assert report.main(["--runs", str(tmp_path / "empty"), "--out", str(tmp_path / "o3")]) == 2


def test_every_override_exists_in_the_composed_recipes(tmp_path, monkeypatch):
    """A typo in a seed key or a shared setting would only show at run time: compose every method's
    recipe (and every ablation variant) with the launcher's exact overrides."""
    from hydra import compose, initialize_config_dir

    from dyjr_verl.methods.dyjr.config import DyJRConfig

    monkeypatch.setenv("DYJR_ASSETS_DIR", str(tmp_path))
    recipes = mini.recipes_dir()
    comp = comparison(tmp_path / "runs", list(METHODS), [3], SharedSettings(steps=7))
    abl = ablation(tmp_path / "abl", list(ABLATION_VARIANTS), 5, SharedSettings(steps=7))
    sql = comparison(tmp_path / "sql", list(METHODS), [3], SharedSettings(steps=7, max_response_length=64), task="sql")
    with initialize_config_dir(config_dir=str(recipes), version_base=None):
        for exp in (comp, abl, sql):
            for run in exp.runs:
                cmd = commands.trainer_command(exp, run, run.dir(exp.out), recipes)
                ov = [o for o in _overrides(cmd) if not o.startswith("hydra.")]
                cfg = compose(config_name=run.recipe, overrides=ov)
                assert cfg.data.seed == cfg.actor_rollout_ref.rollout.seed == run.seed
                assert cfg.actor_rollout_ref.actor.data_loader_seed == run.seed
                assert cfg.trainer.total_training_steps == cfg.trainer.save_freq == 7
                assert cfg.data.max_response_length == exp.shared.max_response_length
                assert cfg.data.train_files == f"{tmp_path}/{exp.task}/train.parquet"
                assert cfg.reward.custom_reward_function.path.endswith(exp.task_settings.reward)
                assert "hf_model" in cfg.actor_rollout_ref.actor.checkpoint.save_contents
                assert list(cfg.trainer.logger) == ["console", "file"]  # the launcher reads the file logger
                if run.method == "dyjr":
                    d = DyJRConfig.from_omegaconf(cfg.dyjr, path="dyjr").validate("dyjr")
                    assert d.replay.seed == run.seed
                    if run.label == "dyjr_age1":
                        assert d.buffer.max_age == 1
                    if run.label == "dyjr_admit_all":
                        assert d.buffer.admit == "all"


def test_regenerating_the_report_keeps_the_hand_written_reading(tmp_path):
    from dyjr_verl.analysis.report import _kept_reading

    readme = tmp_path / "README.md"
    assert _kept_reading(readme) == ""
    readme.write_text("# r\n\n## Reading\n\n_To be written: x_\n")
    assert _kept_reading(readme) == ""
    readme.write_text("# r\n\n## Reading\n\nDyJR ties GRPO.\n\nSecond paragraph.\n")
    assert _kept_reading(readme) == "DyJR ties GRPO.\n\nSecond paragraph."
