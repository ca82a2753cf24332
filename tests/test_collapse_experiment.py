"""Collapse experiment launcher (issue 15): resumable segments, the resume decision, skip-finished, the
command lines, the budget rule and the report; without trainer runs, except the ``e2e`` test that kills
a real 3-step SmolLM2 run after its first checkpoint and resumes it."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from dyjr_verl.experiments import collapse, collapse_config, mini, segments
from dyjr_verl.experiments.collapse_config import (
    ABLATIONS,
    MAIN_METHODS,
    CollapseSettings,
    CostModel,
    ablation,
    comparison,
)
from dyjr_verl.experiments.process import ProcResult, ray_stop
from e2e_utils import machine_lock


def _file_log(path: Path, steps: dict[int, dict]) -> None:
    """Lines as verl's own FileLogger writes them (it truncates the file: "wb")."""
    from unittest import mock

    from verl.utils.tracking import FileLogger

    with mock.patch.dict("os.environ", {"VERL_FILE_LOGGER_PATH": str(path)}):
        logger = FileLogger("dyjr_verl", "fake")
    for step, metrics in steps.items():
        logger.log(metrics, step=step)
    logger.finish()


# ------------------------------------------------------------------------------------------------
# segments: merge, latest checkpoint, where a segment ends
# ------------------------------------------------------------------------------------------------


def test_segments_merge_in_order_and_a_later_segment_replaces_the_discarded_continuation(tmp_path):
    _file_log(segments.segment_path(tmp_path, 0), {0: {"val": 0.1}, **{s: {"x": 0.0 + s} for s in range(1, 9)}})
    _file_log(segments.segment_path(tmp_path, 1), {6: {"x": 106.0}, 7: {"x": 107.0}})  # resumed from 5, killed
    with segments.segment_path(tmp_path, 1).open("a") as f:
        f.write('{"step": 8, "data": {"x"')  # killed mid-write
    _file_log(segments.segment_path(tmp_path, 10), {6: {"x": 206.0}, 10: {"x": 210.0}})  # numeric, not lexical order
    paths = segments.segment_paths(tmp_path)
    assert [p.name for p in paths] == ["metrics.0.jsonl", "metrics.1.jsonl", "metrics.10.jsonl"]
    assert segments.next_segment(tmp_path) == 11
    steps, warnings = segments.merge_segments(paths)
    assert sorted(steps) == [0, 1, 2, 3, 4, 5, 6, 10]  # 7 and 8 belonged to continuations thrown away
    assert steps[5] == {"x": 5.0} and steps[6] == {"x": 206.0} and steps[0] == {"val": 0.1}
    assert len(warnings) == 1 and "metrics.1.jsonl" in warnings[0]


def test_a_bad_line_that_is_not_the_last_is_an_error(tmp_path):
    from dyjr_verl.analysis.steps import StepsError

    seg = segments.segment_path(tmp_path, 0)
    seg.write_text('{"step": 1, "data": {"x": 1}}\n{"step": 2, "da\n{"step": 3, "data": {"x": 3}}\n')
    with pytest.raises(StepsError, match="metrics.0.jsonl"):
        segments.merge_segments([seg])


def test_latest_checkpoint_follows_verls_tracker(tmp_path):
    from verl.utils.checkpoint.checkpoint_manager import find_latest_ckpt_path, get_checkpoint_tracker_filename

    assert Path(get_checkpoint_tracker_filename(str(tmp_path))).name == segments.TRACKER_FILE
    assert segments.latest_checkpoint(tmp_path / "none") == 0
    (tmp_path / segments.TRACKER_FILE).write_text("10")
    assert segments.latest_checkpoint(tmp_path) == 0 and find_latest_ckpt_path(str(tmp_path)) is None  # no folder
    (tmp_path / "global_step_10").mkdir()
    assert segments.latest_checkpoint(tmp_path) == 10
    assert find_latest_ckpt_path(str(tmp_path)).endswith("global_step_10")


def test_segment_end_runs_whole_quanta_that_fit():
    end = segments.segment_end
    assert end(0, 30, 10) == 30  # no budget
    assert end(30, 30, 10, remaining_s=1.0, step_s=60) == 30  # nothing left to train
    assert end(0, 30, 10, remaining_s=2000 + 100 + 50, step_s=60, overhead_s=100, finish_s=50) == 30  # all fits
    assert end(0, 30, 10, remaining_s=1500, step_s=60, overhead_s=100, finish_s=50) == 20  # 2 quanta
    assert end(10, 30, 10, remaining_s=700, step_s=60, overhead_s=50) == 20
    assert end(10, 30, 10, remaining_s=500, step_s=60, overhead_s=50) == 10  # not one quantum: do not launch
    assert end(5, 30, 10, remaining_s=700, step_s=60) == 10  # ends on the quantum grid
    with pytest.raises(ValueError):
        end(0, 30, 0)


# ------------------------------------------------------------------------------------------------
# command lines
# ------------------------------------------------------------------------------------------------


def _inputs(tmp_path: Path) -> collapse.Inputs:
    data = tmp_path / "data"
    data.mkdir(exist_ok=True)
    return collapse.Inputs(model=tmp_path / "smollm2", data=data, val_slice=data / "val_first8.parquet",
                           model_manifest={"source": "gguf", "parameters": 134515008}, data_manifest={"seed": 0})


def _overrides(cmd: list[str]) -> dict[str, str]:
    return dict(o.split("=", 1) for o in cmd[cmd.index("--config-name") + 2:])


def test_trainer_command_resumes_from_the_run_checkpoints(tmp_path):
    exp = comparison(tmp_path / "runs", list(MAIN_METHODS), [4], CollapseSettings(steps=20))
    recipes = collapse.recipes_dir()
    for run in exp.runs:
        run_dir = run.dir(exp.out)
        fresh = collapse.trainer_command(exp, run, run_dir, _inputs(tmp_path), resume_from=0, end_step=20, recipes=recipes)
        again = collapse.trainer_command(exp, run, run_dir, _inputs(tmp_path), resume_from=10, end_step=20, recipes=recipes)
        assert fresh[fresh.index("--config-name") + 1] == f"{run.method}_smollm2_cpu"
        o, r = _overrides(fresh), _overrides(again)
        assert o["trainer.resume_mode"] == "auto" and o["trainer.default_local_dir"] == str(run_dir / "checkpoints")
        assert o["trainer.val_before_train"] == "true" and r["trainer.val_before_train"] == "false"
        assert o["trainer.total_training_steps"] == "20" and o["trainer.save_freq"] == "5"
        assert o["actor_rollout_ref.rollout.val_kwargs.n"] == "64" and o["data.seed"] == "4"
        assert o["data.val_files"].endswith("val_first8.parquet")
        assert (o.get("dyjr.js.divergence") == "forward_kl") == (run.label == "dyjr_fkl")
        assert ("rlep.pool_path" in o) == (run.method == "rlep")
        assert {k: v for k, v in o.items() if k != "trainer.val_before_train"} == \
            {k: v for k, v in r.items() if k != "trainer.val_before_train"}


def test_eval_on_test_for_the_comparison_and_validation_for_the_ablation(tmp_path):
    inputs = _inputs(tmp_path)
    comp = comparison(tmp_path / "r", ["grpo"], [0], CollapseSettings(steps=7))
    abl = ablation(tmp_path / "a", ["klcov"], 0, CollapseSettings(steps=7))
    c = collapse.eval_command(comp, comp.runs[0], comp.runs[0].dir(comp.out), inputs)
    a = collapse.eval_command(abl, abl.runs[0], abl.runs[0].dir(abl.out), inputs)
    assert c[c.index("--data") + 1] == f"arith_test={inputs.data / 'test.parquet'}"
    assert a[a.index("--data") + 1] == f"arith_val={inputs.data / 'val.parquet'}"
    assert c[c.index("--limit") + 1] == "24" and a[a.index("--limit") + 1] == "8"
    # the recipes' reward, not the eval CLI's default by ability ("math": \boxed{} only)
    assert c[c.index("--reward") + 1] == a[a.index("--reward") + 1] == "dyjr_verl.rewards.final_number"
    rlep = comparison(tmp_path / "r", ["rlep"], [0], CollapseSettings(steps=7))
    k = collapse.collect_command(rlep, rlep.runs[0], rlep.runs[0].dir(rlep.out), inputs)
    assert k[k.index("--reward") + 1] == "pkg://dyjr_verl.rewards.final_number"
    assert k[k.index("--max-tokens") + 1] == "64"
    assert c[c.index("--model") + 1].endswith("checkpoints/global_step_7")
    assert c[c.index("--ks") + 1: c.index("--temperature")] == [str(k) for k in range(1, 65)]
    assert c[c.index("--samples") + 1] == "64"


def test_every_override_exists_in_the_composed_recipes(tmp_path, monkeypatch):
    """Compose every method's recipe and every ablation with the launcher's exact overrides; the two
    modes the DyJR trainer does not have yet fail on their own key and nothing else."""
    from hydra import compose, initialize_config_dir
    from hydra.errors import ConfigCompositionException

    from dyjr_verl.methods.dyjr.config import DyJRConfig

    monkeypatch.setenv("DYJR_COLLAPSE_DATA", str(tmp_path / "data"))
    monkeypatch.setenv("DYJR_SMOLLM2_DIR", str(tmp_path / "smollm2"))
    recipes = collapse.recipes_dir()
    comp = comparison(tmp_path / "runs", list(MAIN_METHODS), [3], CollapseSettings())
    abl = ablation(tmp_path / "abl", list(ABLATIONS), 5, CollapseSettings())
    with initialize_config_dir(config_dir=str(recipes), version_base=None):
        for exp in (comp, abl):
            for run in exp.runs:
                cmd = collapse.trainer_command(exp, run, run.dir(exp.out), _inputs(tmp_path), resume_from=0,
                                               end_step=30, recipes=recipes)
                ov = [o for o in cmd[cmd.index("--config-name") + 2:] if not o.startswith("hydra.")]
                try:
                    cfg = compose(config_name=collapse.recipe(run), overrides=ov)
                except ConfigCompositionException as exc:
                    assert run.label in ("dyjr_frozen_ref", "dyjr_replay_pg"), exc
                    assert ABLATIONS[run.label][1][0].split("=")[0] in str(exc)
                    continue
                assert cfg.data.seed == cfg.actor_rollout_ref.rollout.seed == run.seed
                assert cfg.trainer.resume_mode == "auto" and cfg.trainer.test_freq == 10
                assert cfg.actor_rollout_ref.model.path == str(tmp_path / "smollm2")
                assert cfg.data.train_files == f"{tmp_path}/data/train.parquet"
                assert list(cfg.trainer.logger) == ["console", "file"]
                assert cfg.trainer.v1.trainer_mode == ("sync_rank_k" if run.method == "grpo" else run.method)
                assert "optimizer" in cfg.actor_rollout_ref.actor.checkpoint.save_contents  # resumable
                if run.label == "klcov":
                    assert cfg.actor_rollout_ref.actor.policy_loss.loss_mode == "kl_cov"
                if run.method == "dyjr":
                    d = DyJRConfig.from_omegaconf(cfg.dyjr, path="dyjr").validate("dyjr")
                    assert d.replay.seed == run.seed
                    assert (d.js.divergence == "forward_kl") == (run.label == "dyjr_fkl")
                    assert (d.buffer.window == "adaptive") == (run.label == "dyjr_adaptive_window")
                    assert (d.js.coef == 0.0) == (run.label == "dyjr_coef0")


# ------------------------------------------------------------------------------------------------
# the launcher with a fake verl: kill, resume, skip, budget
# ------------------------------------------------------------------------------------------------


class Killed(BaseException):
    """The launcher's session ends (SIGKILL of everything) in the middle of a trainer launch."""


class FakeVerl:
    """Stands in for run_logged, behaving like verl on disk: resume_mode=auto from the tracker file,
    steps logged with verl's FileLogger at $VERL_FILE_LOGGER_PATH, checkpoints every save_freq and at
    the last step; ``kill_after``: the process dies after that step (no later checkpoint)."""

    def __init__(self):
        self.calls: list[dict] = []
        self.kill_after: int | None = None

    def __call__(self, cmd, log_path, *, cwd, env, deadline_s):
        log_path.write_text("start-up noise\n")
        if "verl.trainer.main_ppo" in cmd:
            o = _overrides(cmd)
            assert o["trainer.resume_mode"] == "auto"
            ckpt = Path(o["trainer.default_local_dir"])
            start = segments.latest_checkpoint(ckpt)
            end, save = int(o["trainer.total_training_steps"]), int(o["trainer.save_freq"])
            self.calls.append({"start": start, "end": end, "val_before_train": o["trainer.val_before_train"],
                               "log": Path(env["VERL_FILE_LOGGER_PATH"]).name})
            steps = {0: {"val-core/dyjr/arithmetic/acc/mean@64": 0.2}} if o["trainer.val_before_train"] == "true" else {}
            last = end if self.kill_after is None else min(end, self.kill_after)
            for s in range(start + 1, last + 1):
                steps[s] = {"critic/score/mean": 0.01 * s, "actor/entropy": 1.0 / s, "rank_k/p1": 0.5 + 0.01 * s,
                            "rank_k/p2": 0.1, "rank_k/p3": 0.05, "timing_s/step": 90.0 if s == start + 1 else 60.0,
                            "segment_start": float(start)}
                if s % int(o["trainer.test_freq"]) == 0 or s == end:
                    steps[s]["val-core/dyjr/arithmetic/acc/mean@64"] = 0.2 + 0.01 * s
                    steps[s]["val-aux/dyjr/arithmetic/acc/best@8/mean"] = 0.5
                if s % save == 0 or s == end:
                    (ckpt / f"global_step_{s}" / "actor").mkdir(parents=True, exist_ok=True)
                    (ckpt / segments.TRACKER_FILE).write_text(str(s))
            _file_log(Path(env["VERL_FILE_LOGGER_PATH"]), steps)
            if self.kill_after is not None and self.kill_after < end:
                self.kill_after = None
                raise Killed()
            return ProcResult(0, 120.0 + 60 * (end - start), 150.0, False)
        if "dyjr_verl.eval" in cmd:
            self.calls.append({"eval": cmd[cmd.index("--model") + 1]})
            assert Path(cmd[cmd.index("--model") + 1]).is_dir()
            out = Path(cmd[cmd.index("--out") + 1])
            (out / "merged_model").mkdir(parents=True, exist_ok=True)
            rows = [{"benchmark": "b", "index": i, "greedy": i % 2 == 0, "samples": [1] * (8 * i) + [0] * (64 - 8 * i),
                     "distinct_correct": i} for i in range(4)]
            (out / "scores.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
            (out / "generations.jsonl").write_text("{}")
            return ProcResult(0, 300.0, None, False)
        if "dyjr_verl.methods.rlep.collect" in cmd:
            self.calls.append({"collect": True})
            Path(cmd[cmd.index("--out") + 1]).write_text("pool")
            # a resumed collection: an earlier launch's finished chunks took 100 s
            log_path.write_text('rlep_collect: {"pool_questions": 12, "resumed_questions": 3, "resumed_chunk_s": 100.0}\n')
            return ProcResult(0, 400.0, None, False)
        raise AssertionError(cmd)


@pytest.fixture
def fake_verl(tmp_path, monkeypatch):
    fake = FakeVerl()
    for module in (collapse, mini):  # mini's _stage runs the collection and the evaluation
        monkeypatch.setattr(module, "run_logged", fake)
        monkeypatch.setattr(module, "ray_stop", lambda *a, **k: None)
    monkeypatch.setattr(collapse, "LOCK_PATH", tmp_path / "e2e.lock")
    monkeypatch.setattr(collapse, "prepare_inputs", lambda exp, progress: _inputs(tmp_path))
    return fake


def _launch(exp, cost: CostModel | None = None, **kw) -> int:
    return collapse.launch(exp, cost=cost or CostModel(), progress=lambda s: None, **kw)


def test_a_killed_run_resumes_from_its_last_checkpoint_and_a_finished_one_is_skipped(tmp_path, fake_verl):
    exp = comparison(tmp_path / "runs", ["dyjr_fkl"], [0], CollapseSettings(steps=12, save_freq=5, test_freq=10))
    run_dir = exp.runs[0].dir(exp.out)
    fake_verl.kill_after = 8  # checkpoint at 5, steps 6..8 logged, then the session ends
    with pytest.raises(Killed):
        _launch(exp)
    assert segments.latest_checkpoint(run_dir / "checkpoints") == 5 and not (run_dir / "run.json").exists()
    assert collapse.run_state(run_dir, json.loads((run_dir / "spec.json").read_text())["fingerprint"]) == "resume"

    assert _launch(exp) == 0
    train = [c for c in fake_verl.calls if "start" in c]
    assert train == [{"start": 0, "end": 12, "val_before_train": "true", "log": "metrics.0.jsonl"},
                     {"start": 5, "end": 12, "val_before_train": "false", "log": "metrics.1.jsonl"}]
    assert fake_verl.calls[-1]["eval"].endswith("checkpoints/global_step_12")
    record = json.loads((run_dir / "run.json").read_text())
    steps = {int(s): m for s, m in record["steps"].items()}
    assert sorted(steps) == list(range(13))
    assert all(steps[s]["rank_k/p1"] == pytest.approx(0.5 + 0.01 * s) for s in range(1, 13))
    assert "val-core/dyjr/arithmetic/acc/mean@64" in steps[0] and "val-core/dyjr/arithmetic/acc/mean@64" in steps[10]
    assert [s["resumed_from"] for s in record["segments"]] == [0, 5]
    assert record["timing"]["steady_step_s"] == 60.0 and record["timing"]["segments"] == 2
    assert record["eval"]["pass@64"] > record["eval"]["pass@1"] and record["extra_overrides"] == ["dyjr.js.divergence=forward_kl"]
    assert not (run_dir / "checkpoints").exists() and not (run_dir / "eval" / "merged_model").exists()
    assert (run_dir / "metrics.0.jsonl.gz").is_file() and (run_dir / "main_ppo.1.log.gz").is_file()
    assert (exp.out / ".gitignore").read_text().count("checkpoints/") == 1

    n = len(fake_verl.calls)
    assert _launch(exp) == 0 and len(fake_verl.calls) == n  # finished: skipped


def test_a_run_whose_training_finished_is_only_evaluated(tmp_path, fake_verl, monkeypatch):
    exp = comparison(tmp_path / "runs", ["grpo"], [0], CollapseSettings(steps=10, save_freq=5, test_freq=10))
    run_dir = exp.runs[0].dir(exp.out)
    fake_verl.kill_after = 10
    original = fake_verl.__call__

    def die_in_eval(cmd, *a, **k):
        if "dyjr_verl.eval" in cmd:
            raise Killed()
        return original(cmd, *a, **k)

    for module in (collapse, mini):
        monkeypatch.setattr(module, "run_logged", die_in_eval)
    with pytest.raises(Killed):
        _launch(exp)
    for module in (collapse, mini):
        monkeypatch.setattr(module, "run_logged", fake_verl)
    assert segments.latest_checkpoint(run_dir / "checkpoints") == 10
    assert _launch(exp) == 0
    assert [c for c in fake_verl.calls if "start" in c] == [{"start": 0, "end": 10, "val_before_train": "true",
                                                             "log": "metrics.0.jsonl"}]
    assert (run_dir / "run.json").is_file()


def test_the_budget_stops_on_a_checkpoint_and_the_next_launch_continues(tmp_path, fake_verl):
    exp = comparison(tmp_path / "runs", ["grpo", "dyjr"], [0], CollapseSettings(steps=30, save_freq=5, test_freq=10))
    # 25 min: start-up + step-0 and step-10 validations + 10 steps fit, 20 do not (60 s per step)
    slow = CostModel(step_s=60.0, validation_s=77.0)
    assert _launch(exp, slow, budget_min=25) == 0
    assert [c["end"] for c in fake_verl.calls if "start" in c] == [10]  # dyjr not started: budget spent
    run_dir = exp.runs[0].dir(exp.out)
    assert segments.latest_checkpoint(run_dir / "checkpoints") == 10 and not (run_dir / "run.json").exists()
    assert not exp.runs[1].dir(exp.out).exists()
    assert _launch(exp, budget_min=0.01) == 0  # not one quantum fits: nothing launched
    assert [c["end"] for c in fake_verl.calls if "start" in c] == [10]
    assert _launch(exp) == 0
    assert [(c["start"], c["end"]) for c in fake_verl.calls if "start" in c] == [(0, 10), (10, 30), (0, 30)]
    assert all((r.dir(exp.out) / "run.json").is_file() for r in exp.runs)


def test_rlep_collects_once_per_seed_and_keeps_the_pool_until_the_run_is_finished(tmp_path, fake_verl):
    exp = comparison(tmp_path / "runs", ["rlep"], [0], CollapseSettings(steps=10, save_freq=5, test_freq=10))
    fake_verl.kill_after = 7
    with pytest.raises(Killed):
        _launch(exp)
    assert (exp.runs[0].dir(exp.out) / "rlep_pool.parquet").is_file()
    assert _launch(exp) == 0
    assert sum("collect" in c for c in fake_verl.calls) == 1
    record = json.loads((exp.runs[0].dir(exp.out) / "run.json").read_text())
    assert record["timing"]["total_wall_s"] == record["timing"]["collect_s"] + record["timing"]["train_wall_s"]
    # this launch's 400 s + the 100 s of the chunks it resumed: what the whole pool cost
    assert record["timing"]["collect_s"] == 500.0 and "start model" in record["rlep_pool"]
    assert "collect_untimed_questions" not in record["timing"]
    assert not (exp.runs[0].dir(exp.out) / "rlep_pool.parquet").exists()


def test_a_partial_run_is_extended_to_more_steps_from_its_checkpoint_but_not_shortened(tmp_path, fake_verl):
    exp = comparison(tmp_path / "runs", ["grpo"], [0], CollapseSettings(steps=10, save_freq=5, test_freq=10))
    run_dir = exp.runs[0].dir(exp.out)
    longer = comparison(tmp_path / "runs", ["grpo"], [0], CollapseSettings(steps=20, save_freq=5, test_freq=10))
    fake_verl.kill_after = 8
    with pytest.raises(Killed):
        _launch(exp)
    assert segments.latest_checkpoint(run_dir / "checkpoints") == 5
    assert _launch(longer) == 0
    assert [c["start"] for c in fake_verl.calls if "start" in c] == [0, 5]  # continued, not restarted
    record = json.loads((run_dir / "run.json").read_text())
    assert sorted(int(s) for s in record["steps"]) == list(range(21)) and record["settings"]["steps"] == 20
    assert all("commit" in s for s in record["segments"])
    # finished with 20 steps: a 30-step launch cannot extend it (its checkpoints are gone)
    with pytest.raises(collapse.CollapseError, match="other settings"):
        _launch(comparison(tmp_path / "runs", ["grpo"], [0], CollapseSettings(steps=30, save_freq=5, test_freq=10)))

    short_dir = tmp_path / "short"
    exp = comparison(short_dir, ["grpo"], [0], CollapseSettings(steps=20, save_freq=5, test_freq=10))
    fake_verl.kill_after = 16
    with pytest.raises(Killed):
        _launch(exp)  # checkpoint 15
    with pytest.raises(collapse.CollapseError, match="other settings"):  # 10 steps < the checkpoint's 15
        _launch(comparison(short_dir, ["grpo"], [0], CollapseSettings(steps=10, save_freq=5, test_freq=10)))


def test_runs_made_with_other_settings_are_refused_unless_redo_stale(tmp_path, fake_verl):
    exp = comparison(tmp_path / "runs", ["grpo"], [0], CollapseSettings(steps=10))
    fake_verl.kill_after = 6
    with pytest.raises(Killed):
        _launch(exp)
    other = comparison(tmp_path / "runs", ["grpo"], [0], CollapseSettings(steps=10, val_k=32))
    with pytest.raises(collapse.CollapseError, match="other settings"):
        _launch(other)
    assert _launch(other, redo_stale=True) == 0
    assert [c["start"] for c in fake_verl.calls if "start" in c] == [0, 0]  # afresh, not from the old checkpoint


def test_a_failed_segment_keeps_its_checkpoints_for_the_next_launch(tmp_path, fake_verl, monkeypatch):
    exp = comparison(tmp_path / "runs", ["grpo"], [0], CollapseSettings(steps=10, save_freq=5, test_freq=10))
    calls = []

    def crash_after_step_5(cmd, log_path, **kw):
        calls.append(cmd)
        fake_verl.kill_after = 7
        try:
            fake_verl(cmd, log_path, **kw)
        except Killed:
            return ProcResult(1, 50.0, None, False)
        raise AssertionError("expected the fake to stop at step 7")

    monkeypatch.setattr(collapse, "run_logged", crash_after_step_5)
    assert _launch(exp) == 1
    run_dir = exp.runs[0].dir(exp.out)
    assert json.loads((run_dir / "failed.json").read_text())["stage"] == "main_ppo"
    assert segments.latest_checkpoint(run_dir / "checkpoints") == 5
    monkeypatch.setattr(collapse, "run_logged", fake_verl)
    assert _launch(exp) == 0
    assert [c["start"] for c in fake_verl.calls if "start" in c][-1] == 5
    assert (run_dir / "run.json").is_file() and not (run_dir / "failed.json").exists()


def test_dry_run_lists_every_ablation_with_its_overrides(tmp_path, fake_verl, capsys):
    assert collapse.main(["ablation", "--dry-run", "--out", str(tmp_path / "abl")]) == 0
    out = capsys.readouterr().out
    for name, (_, overrides) in ABLATIONS.items():
        assert f"{name}/seed0: fresh" in out
        assert all(o in out for o in overrides)
    assert "dyjr.buffer.frozen=true" in out and "dyjr.replay.as_pg=true" in out
    assert "trainer.resume_mode=auto" in out and not (tmp_path / "abl" / "klcov").exists()


def test_cli_rejects_bad_input_with_one_line(capsys):
    for argv in (["run", "--methods", "ppo"], ["run", "--seeds", "1", "1"], ["ablation", "--variants", "x"],
                 ["run", "--steps", "0"], ["run", "--budget-min", "-3"]):
        assert collapse.main(argv) == 2, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: "), err


def test_the_estimate_adds_up():
    cost = CostModel()
    s = CollapseSettings(steps=20)
    exp = comparison(Path("r"), list(MAIN_METHODS), [0, 1, 2], s)
    per = cost.run_s(s, exp.eval_questions)
    assert cost.validations(s) == 3  # steps 0, 10, 20
    assert per["training steps"] == 20 * cost.step_s and per["held-out validation"] == 3 * cost.validation_s and per["total"] == pytest.approx(sum(v for k, v in per.items() if k != "total"))
    est = cost.experiment_s(exp)
    assert est["rlep_collections"] == 3 and est["total_s"] == pytest.approx(15 * per["total"] + 3 * est["collect_s"])
    text = collapse.estimate_text(cost, 30, Path("d"))
    assert "main comparison: 15 runs" in text and "ablations: 6 runs" in text and text.splitlines()[-1].startswith("total:")


# ------------------------------------------------------------------------------------------------
# report
# ------------------------------------------------------------------------------------------------


def _records(root: Path, labels, seeds, kind="comparison"):
    for label in labels:
        for seed in seeds:
            d = root / label / f"seed{seed}"
            d.mkdir(parents=True)
            bump = 0.05 if label.startswith("dyjr") else 0.0
            steps = {str(s): {"actor/entropy": 1.0 / (1 + s) + bump, "critic/score/mean": 0.02 * s,
                              "rank_k/p1": 0.6 + 0.01 * s - bump, "rank_k/p2": 0.1 + bump, "rank_k/p3": 0.05,
                              "response_length/mean": 40.0 - 3 * s, "timing_s/step": 60.0} for s in range(1, 11)}
            for s in (0, 5, 10):
                steps.setdefault(str(s), {})["val-core/dyjr/arithmetic/acc/mean@64"] = 0.2 + 0.01 * s + seed * 0.01
            ev = {"greedy": 0.5, "avg@64": 0.3 + bump, "distinct_correct": 1.5,
                  **{f"pass@{k}": min(1.0, 0.3 + 0.01 * k) for k in range(1, 65)}}
            (d / "run.json").write_text(json.dumps({
                "label": label, "method": label.split("_")[0] if label != "klcov" else "grpo", "seed": seed,
                "kind": kind, "status": "done", "steps": steps, "eval": ev,
                "settings": {"steps": 10, "test_freq": 5, "val_questions": 8, "val_k": 64},
                "eval_settings": {"split": "test" if kind == "comparison" else "val", "samples": 64, "temperature": 1.0,
                                  "questions": 32},
                "timing": {"steady_step_s": 60.0, "segments": 1, "collect_s": 0.0, "total_wall_s": 900.0},
                "segments": [{"segment": 0, "commit": ("ea39d0c0" if seed else "fa266c11") + "0" * 32}]}))


def test_report_writes_the_six_panels_response_length_pass_at_k_tables_and_keeps_the_reading(tmp_path):
    from dyjr_verl.analysis.collapse_report import write_collapse_report

    runs, abl, out = tmp_path / "runs", tmp_path / "abl", tmp_path / "out"
    _records(runs, list(MAIN_METHODS), [0, 1, 2])
    _records(abl, ["klcov", "dyjr_coef0"], [0], kind="ablation")
    readme = write_collapse_report(runs, out, abl)
    for png in ("entropy.png", "reward.png", "heldout_mean_at_k.png", "rank1.png", "rank2.png", "rank3.png",
                "response_length.png", "pass_at_k.png", "per_seed.png", "ablation.png"):
        assert (out / png).stat().st_size > 1000, png
    md = readme.read_text()
    assert "`ea39d0c`: DyJR (JS) 1, DyJR (JS) 2," in md and "`fa266c1`: DyJR (JS) 0," in md  # code per run
    assert "![per seed](per_seed.png)" in md and "![ablations over training steps](ablation.png)" in md
    # back from the collapse: entropy's last 5 (steps 6..10 of 1/(1+s)) minus its lowest 3-step average
    # (steps 8..10), Rank-1's highest 3-step average minus its last 5; GRPO's row (no bump)
    assert "| GRPO | 3 |" in md and "| 0.013 ± 0.000 | 0.010 ± 0.000 |" in md.split("| GRPO | 3 |")[1].splitlines()[0]
    spread = md.split("## DyJR against the seed spread")[1].split("## Cost per method")[0]
    assert "DyJR (JS) (3 seeds) vs GRPO (3 seeds)" in spread and "| DyJR (forward KL) − GRPO |" in spread
    assert "| entropy: last 5 − lowest (3-step avg) |" in spread and "test greedy" in spread
    assert "Step and wall times" not in spread and "most common answer" not in spread
    assert "| DyJR (forward KL) | 3 |" in md and "held-out mean@64 at the end %" in md
    assert "## Cost per method" in md and "## Ablations (validation split)" in md and "| klcov | 1 |" in md
    abl_md = md.split("## Ablations")[1].split("## Reading")[0]
    assert "GRPO (main, seed 0)" in abl_md and "test pass@64" not in abl_md
    # the references' final evaluation is on the test split: never shown in the validation columns
    ref_row = next(line for line in abl_md.splitlines() if line.startswith("| DyJR (JS) (main, seed 0) |"))
    assert ref_row.rstrip(" |").endswith("| – | –"), ref_row  # val greedy, val pass@64
    assert "| 50.0 |" in next(line for line in abl_md.splitlines() if line.startswith("| klcov |"))
    assert "30.0 ± 0.0" in md or "30.0" in md  # the held-out column at the last step, as a percentage
    assert "response tokens, last 5 steps" in md and "| 16.0 ± 0.0 |" in md  # mean of 40 - 3s over steps 6..10
    assert "most common answer, share of samples %" in md
    readme.write_text(md.replace(md.split("## Reading\n")[1], "\nDyJR re-inflates entropy.\n"))
    assert "DyJR re-inflates entropy." in write_collapse_report(runs, out, abl).read_text()


def test_answer_spread_finds_a_collapse_onto_one_answer_and_old_records_get_it_from_their_scores(tmp_path):
    from dyjr_verl.experiments.records import answer_spread, eval_summary, load_runs

    rows = [{"benchmark": "b", "index": i, "greedy": True, "samples": [1, 0, 0, 0], "distinct_correct": 1,
             "answers": ["1", "1", "1", str(i + 2)]} for i in range(3)]
    spread = answer_spread(rows)
    assert spread == {"distinct_answers": 2.0, "top_answer_share": pytest.approx(9 / 12)}
    assert answer_spread([{**r, "answers": None} for r in rows]) == {}  # scores written without answers
    (tmp_path / "eval").mkdir()
    (tmp_path / "eval" / "scores.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    assert eval_summary(tmp_path / "eval", [1])["top_answer_share"] == pytest.approx(0.75)
    run_dir = tmp_path / "runs" / "grpo" / "seed0"
    (run_dir / "eval").mkdir(parents=True)
    (run_dir / "eval" / "scores.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    (run_dir / "run.json").write_text(json.dumps({"label": "grpo", "eval": {"greedy": 1.0}}))
    assert load_runs(tmp_path / "runs")[0]["eval"] == {"greedy": 1.0, **spread}


def test_report_without_runs_is_one_error_line(tmp_path, capsys):
    assert collapse.main(["report", "--runs", str(tmp_path / "none"), "--out", str(tmp_path / "o")]) == 2
    assert capsys.readouterr().err.startswith("error: no finished run")


# ------------------------------------------------------------------------------------------------
# a real run of verl, killed after its first checkpoint and resumed
# ------------------------------------------------------------------------------------------------


@pytest.mark.e2e
@pytest.mark.smollm2
def test_real_grpo_smollm2_run_killed_after_its_first_checkpoint_resumes_from_it(tmp_path):
    """3 steps of grpo_smollm2_cpu with a checkpoint every step; the trainer's process group is killed
    once global_step_1 exists, then relaunched exactly as the launcher does (resume_mode=auto, the same
    default_local_dir, a new metrics segment): it must start at step 2, not from scratch."""
    from dyjr_verl.assets.smollm2 import cached_manifest, default_smollm2_dir
    from dyjr_verl.experiments.collapse_config import DEFAULT_DATA_DIR

    model = Path(os.environ.get("DYJR_SMOLLM2_DIR", default_smollm2_dir()))
    if cached_manifest(model) is None or not (DEFAULT_DATA_DIR / "train.parquet").is_file():
        pytest.fail("needs `make smollm2` and the collapse data: run it as `make test-smollm2`")
    # test_freq beyond the run: verl validates only at the last step; 4 samples instead of 64 (cost)
    exp = comparison(tmp_path / "runs", ["grpo"], [0], CollapseSettings(steps=3, save_freq=1, test_freq=1000))
    inputs = collapse.Inputs(model, DEFAULT_DATA_DIR, collapse.write_val_slice(DEFAULT_DATA_DIR, 8), {}, {})
    run = exp.runs[0]
    run_dir = run.dir(exp.out)
    run_dir.mkdir(parents=True)

    def launch(n: int, kill_at_checkpoint: bool) -> int:
        start = segments.latest_checkpoint(run_dir / "checkpoints")
        cmd = collapse.trainer_command(exp, run, run_dir, inputs, resume_from=start, end_step=3,
                                       recipes=collapse.recipes_dir())
        cheap = {"trainer.val_before_train": "false", "actor_rollout_ref.rollout.val_kwargs.n": "4"}
        cmd = [f"{o.split('=')[0]}={cheap[o.split('=')[0]]}" if o.split("=")[0] in cheap else o for o in cmd]
        env = collapse.child_env(inputs, segments.segment_path(run_dir, n))
        with (run_dir / f"main_ppo.{n}.log").open("w") as log:
            proc = subprocess.Popen(["nice", "-n", "10", *cmd], cwd=run_dir, env=env, stdout=log,
                                    stderr=subprocess.STDOUT, start_new_session=True)
            t0 = time.monotonic()
            while proc.poll() is None and time.monotonic() - t0 < 1500:
                if kill_at_checkpoint and segments.latest_checkpoint(run_dir / "checkpoints") >= 1:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
                    break
                time.sleep(2)
            else:
                if proc.poll() is None:
                    os.killpg(proc.pid, signal.SIGKILL)
        ray_stop()
        return start

    try:
        with machine_lock():  # the machine-wide lock every trainer run takes
            assert launch(0, kill_at_checkpoint=True) == 0
            first = segments.latest_checkpoint(run_dir / "checkpoints")
            assert 1 <= first < 3, (run_dir / "main_ppo.0.log").read_text()[-3000:]
            assert launch(1, kill_at_checkpoint=False) == first
            assert segments.latest_checkpoint(run_dir / "checkpoints") == 3, (run_dir / "main_ppo.1.log").read_text()[-3000:]
            second, _ = segments.read_segment(segments.segment_path(run_dir, 1))
            assert min(second) == first + 1 and max(second) == 3  # resumed, not from scratch
            steps, _ = collapse.read_run_steps(run_dir)
            assert sorted(steps) == [1, 2, 3] and all("actor/entropy" in steps[s] for s in steps)
            assert "rank_k/p1" in steps[3]
    finally:
        shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)


def test_an_edited_recipe_makes_a_partial_run_stale(tmp_path, fake_verl, monkeypatch):
    recipes = tmp_path / "recipes"
    recipes.mkdir()
    (recipes / "_smollm2_arith.yaml").write_text("reward: {reward_manager: {name: naive}}\n")
    monkeypatch.setattr(collapse_config, "recipes_dir", lambda: recipes)
    exp = comparison(tmp_path / "runs", ["grpo"], [0], CollapseSettings(steps=10, save_freq=5, test_freq=10))
    fake_verl.kill_after = 6
    with pytest.raises(Killed):
        _launch(exp)
    (recipes / "_smollm2_arith.yaml").write_text("reward: {reward_manager: {name: dapo}}\n")
    with pytest.raises(collapse.CollapseError, match="other settings"):
        _launch(exp)
