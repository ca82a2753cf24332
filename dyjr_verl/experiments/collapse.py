"""Collapse experiment (issue 15, steps 5-6): GRPO, DyJR (JS), DyJR (forward KL), RLEP and Ex-GRPO on
SmolLM2-135M-Instruct in the regime where GRPO collapses, >= 3 seeds, plus ablations; resumable
across sessions.

    python -m dyjr_verl.experiments.collapse run [--methods grpo dyjr dyjr_fkl rlep exgrpo] [--seeds 0 1 2] \\
        [--steps N] [--out results/collapse/runs] [--budget-min M] [--dry-run] [--redo-stale]
    python -m dyjr_verl.experiments.collapse ablation [--variants ...] [--seed 0] [--out results/collapse/ablation] ...
    python -m dyjr_verl.experiments.collapse report [--runs ...] [--ablation ...] [--out results/collapse]
    python -m dyjr_verl.experiments.collapse estimate [--step-s 40] [--tokens-per-s 300] [--steps N]

Per run (``<out>/<label>/seed<s>/``), under ``/tmp/dyjr_e2e.lock``: RLEP's pool from the start model
(RLEP only, once per seed, kept until the run is finished), then ``main_ppo`` with the method's
``<method>_smollm2_cpu`` recipe, checkpointing every ``save_freq`` steps and validating on the first
``val_questions`` questions of val.parquet every ``test_freq`` steps (``val_k`` samples at T = 1:
verl's ``val-core/<source>/acc/mean@K``, ``best@K``, ``maj@K``), then the eval CLI on the first
``eval_questions`` questions of the test split (validation split for the ablation): greedy, 64
samples, pass@k for k = 1..64, distinct correct answers. Collection and evaluation score with the
recipes' reward, ``dyjr_verl.rewards.final_number`` (:data:`REWARD`). ``run.json`` marks a finished run; then the
checkpoints, the pool and the merged model are deleted.

**Resume.** A run without ``run.json`` whose ``spec.json`` has the current training fingerprint (every
setting but the run's length: ``--steps`` may grow between launches) is continued:
the trainer is relaunched with ``trainer.resume_mode=auto`` on the same ``checkpoints/`` and goes on
from the latest checkpoint, logging to a new ``metrics.<n>.jsonl`` (verl's file logger truncates its
file); the segments are merged by :mod:`dyjr_verl.experiments.segments`. A run whose training is
complete but whose evaluation is missing is only evaluated. Partial or finished runs made with other
settings are refused (one ``error:`` line) unless ``--redo-stale``, which starts them afresh.

**Budget** (``--budget-min M``): a segment is launched only when at least one checkpoint quantum
(``lcm(save_freq, test_freq)`` steps) fits in the minutes left, at the run's own measured step time
(else ``--step-s``) plus start-up and validations; it runs to the end of the run when everything,
evaluation included, fits, otherwise to the last quantum that fits, so it stops on a checkpoint and
loses nothing. When not one quantum fits, nothing more is launched and the command exits 0 with the
runs left. A kill (end of a session) loses at most ``save_freq`` steps.

**Cost** (``estimate``; docs/collapse.md), from the comparison's GRPO seed 0 (results/collapse/search.md
s4: 40 s per step, 74-150 s per validation, start-up 90 s, checkpoint 5 s) and 45 generated tokens per
start-model sample at ~300 tokens/s: one 30-step run is ~34 min (measured: 30.4 min of training, 3.8 min
of test evaluation), the 15 main runs plus three RLEP collections ~9 h, the six ablations ~3 h.
Resumable: docs/collapse.md says how to split it across sessions.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from dyjr_verl.analysis.steps import FILE_LOGGER_ENV, Steps, StepsError
from dyjr_verl.experiments import commands, segments
from dyjr_verl.experiments.collapse_config import (
    ABLATIONS,
    DATA_ENV,
    DEFAULT_DATA_DIR,
    DEFAULT_SEEDS,
    MAIN_METHODS,
    MODEL_ENV,
    CollapseExperiment,
    CollapseSettings,
    CostModel,
    ablation,
    comparison,
)
from dyjr_verl.experiments.config import LOCK_PATH, RunSpec
from dyjr_verl.experiments.mini import StepFailed, _collect_summary, _stage, _tail
from dyjr_verl.experiments.process import LockTimeout, e2e_lock, ray_stop, run_logged
from dyjr_verl.experiments.records import (
    FAILED_FILE,
    RUN_FILE,
    Cleanup,
    eval_summary,
    gzip_file,
    keep_metrics,
    write_json_atomic,
)
from dyjr_verl.recipes import recipes_dir

SPEC_FILE = "spec.json"  # written at a run's first launch: its fingerprint decides whether to resume
SEGMENTS_FILE = "segments.json"  # one entry per trainer launch (wall time, resume step, end step, rc)
CHECKPOINTS = "checkpoints"
VAL_KEEP = ("val-core/",)  # held-out mean@K, best@K, maj@K
VAL_AUX_KEEP = "/acc/best@"  # val-aux best@k for k < K: pass@k curves of the held-out slice over training


#: the reward of _smollm2_arith.yaml, for RLEP's collection and the final evaluation: SmolLM2 states
#: answers in prose, so "math" (\boxed{} or an answer line) would score nearly everything 0
REWARD = "final_number"


class CollapseError(ValueError):
    """Bad input or a refused action: one ``error:`` line, exit code 2."""


# ------------------------------------------------------------------------------------------------
# inputs: the model, the data, the validation slice
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Inputs:
    model: Path
    data: Path
    val_slice: Path
    model_manifest: dict
    data_manifest: dict


def val_slice_path(data_dir: Path, questions: int) -> Path:
    return data_dir / f"val_first{questions}.parquet"


def write_val_slice(data_dir: Path, questions: int) -> Path:
    """The first ``questions`` rows of val.parquet: the same held-out questions for every run and seed
    (verl's ``data.val_max_samples`` draws them at random with ``data.seed``, i.e. per seed)."""
    import pyarrow.parquet as pq

    out = val_slice_path(data_dir, questions)
    table = pq.read_table(data_dir / "val.parquet")
    if table.num_rows < questions:
        raise CollapseError(f"{data_dir / 'val.parquet'} has {table.num_rows} questions, fewer than {questions}")
    tmp = out.with_name(out.name + ".tmp")
    pq.write_table(table.slice(0, questions), tmp)
    os.replace(tmp, out)
    return out


def prepare_inputs(exp: CollapseExperiment, progress: Callable[[str], None]) -> Inputs:
    """SmolLM2's HF folder (built once from the installed wheel) and the word problems (built once)."""
    from dyjr_verl.assets.smollm2 import MissingPackages, build_smollm2
    from dyjr_verl.experiments import collapse_data

    try:
        model = build_smollm2(Path(os.environ[MODEL_ENV]) if MODEL_ENV in os.environ else None)
    except MissingPackages as exc:
        raise CollapseError(str(exc)) from None
    if not (exp.data_dir / "MANIFEST.json").is_file():
        progress(f"building the word problems in {exp.data_dir}")
        collapse_data.build(exp.data_dir)
    data_manifest = json.loads((exp.data_dir / "MANIFEST.json").read_text())
    return Inputs(model.root, exp.data_dir, write_val_slice(exp.data_dir, exp.settings.val_questions),
                  model.manifest, data_manifest)


# ------------------------------------------------------------------------------------------------
# one run
# ------------------------------------------------------------------------------------------------


def recipe(run: RunSpec) -> str:
    return f"{run.method}_smollm2_cpu"


def trainer_command(exp: CollapseExperiment, run: RunSpec, run_dir: Path, inputs: Inputs, *, resume_from: int,
                    end_step: int, recipes: Path) -> list[str]:
    overrides = [
        *exp.settings.overrides(end_step=end_step, val_files=inputs.val_slice, checkpoints=run_dir / CHECKPOINTS,
                                resume_from=resume_from),
        *commands.seed_overrides(run.method, run.seed),
        f"trainer.experiment_name=collapse_{run.label}_seed{run.seed}",
        "hydra.run.dir=.",  # the run directory is the cwd; no dated outputs/ tree
        "hydra.output_subdir=null",
    ]
    if run.method == "rlep":
        overrides.append(f"rlep.pool_path={commands.rlep_pool_path(run_dir)}")
    overrides += list(run.extra)  # the method's or ablation's settings last, so they win
    return commands.main_ppo_command(recipes, recipe(run), overrides)


def collect_command(exp: CollapseExperiment, run: RunSpec, run_dir: Path, inputs: Inputs) -> list[str]:
    """RLEP's pool from the start model (SmolLM2 stands in for RLEP's trained phase-1 checkpoint)."""
    return commands.rlep_collect_command(inputs.model, inputs.data / "train.parquet", commands.rlep_pool_path(run_dir),
                                         REWARD, exp.collect, exp.settings.max_response_length, run.seed)


def eval_command(exp: CollapseExperiment, run: RunSpec, run_dir: Path, inputs: Inputs) -> list[str]:
    split = exp.eval_split
    return commands.eval_cli_command(run_dir / CHECKPOINTS / f"global_step_{exp.settings.steps}", f"arith_{split}",
                                     inputs.data / f"{split}.parquet", exp.eval, exp.settings.max_response_length,
                                     run.seed, run_dir / "eval", limit=exp.eval_questions) + [
        "--reward", f"dyjr_verl.rewards.{REWARD}"]  # without it the eval CLI picks "math" from the rows' ability


def child_env(inputs: Inputs, segment_file: Path | None = None) -> dict[str, str]:
    env = {**os.environ, MODEL_ENV: str(inputs.model), DATA_ENV: str(inputs.data), "RAY_DEDUP_LOGS": "0",
           "HYDRA_FULL_ERROR": "1", "PYTHONUNBUFFERED": "1"}  # step lines arrive when they happen
    if segment_file is not None:
        env[FILE_LOGGER_ENV] = str(segment_file)
    return env


def run_state(run_dir: Path, fingerprint: str, training_fingerprint: str | None = None, steps: int | None = None) -> str:
    """``done`` (skip) | ``stale`` (refuse unless --redo-stale) | ``resume`` | ``fresh``. A finished run
    must match ``fingerprint``; a partial one ``training_fingerprint`` (its length may grow, not shrink
    below its latest checkpoint)."""
    for name, ok, expected in ((RUN_FILE, "done", fingerprint), (SPEC_FILE, "resume", training_fingerprint or fingerprint)):
        path = run_dir / name
        if path.is_file():
            try:
                record = json.loads(path.read_text())
            except json.JSONDecodeError:
                return "fresh"  # a file cut short by a kill: nothing to trust in the directory
            if record.get("fingerprint") != expected:
                return "stale"
            if ok == "resume" and steps is not None and segments.latest_checkpoint(run_dir / CHECKPOINTS) > steps:
                return "stale"  # trained past the requested length: cannot be shortened
            return ok
    return "fresh"


def run_fingerprints(exp: CollapseExperiment, run: RunSpec, inputs: Inputs) -> dict[str, Any]:
    """run_state's arguments for ``run``."""
    return {"fingerprint": exp.fingerprint(run, inputs.data_manifest, inputs.model_manifest),
            "training_fingerprint": exp.fingerprint(run, inputs.data_manifest, inputs.model_manifest, training_only=True),
            "steps": exp.settings.steps}


def code_commit() -> str | None:
    """The commit of the checkout this package runs from (recorded per segment: runs span sessions)."""
    try:
        out = subprocess.run(["git", "-C", str(Path(__file__).resolve().parent), "rev-parse", "HEAD"],
                             capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def read_run_steps(run_dir: Path) -> tuple[Steps, list[str]]:
    return segments.merge_segments(segments.segment_paths(run_dir))


def _load_segments(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / SEGMENTS_FILE
    return json.loads(path.read_text()) if path.is_file() else []


def measured_step_s(steps: Steps, segs: list[dict[str, Any]]) -> float | None:
    """Median ``timing_s/step`` without each launch's first step (warm-up): the steady step. Checkpoint
    steps are inside verl's step timer and slower; the median is not moved by them."""
    firsts = {s["resumed_from"] + 1 for s in segs} | {1}
    times = [m["timing_s/step"] for s, m in steps.items() if s not in firsts and "timing_s/step" in m]
    return statistics.median(times) if times else None


def kept_steps(steps: Steps) -> dict[str, dict[str, float]]:
    """The per-step metrics run.json keeps: the miniature's set plus the held-out validation's."""
    kept = keep_metrics(steps)
    for step, m in steps.items():
        val = {k: v for k, v in m.items() if k.startswith(VAL_KEEP) or (k.startswith("val-aux/") and VAL_AUX_KEEP in k)}
        if val:
            kept.setdefault(str(step), {}).update(val)
    return kept


@dataclass
class Budget:
    """``--budget-min``: seconds left, or None without a budget."""

    deadline: float | None

    def remaining(self) -> float | None:
        return None if self.deadline is None else self.deadline - time.monotonic()


def plan_segment(exp: CollapseExperiment, run_dir: Path, budget: Budget, cost: CostModel, *,
                 fresh: bool = False) -> tuple[int, int]:
    """(latest checkpoint, end step of the next segment); equal: nothing to launch now. ``fresh``: the
    directory's contents will be wiped, so start from 0 at the assumed step time."""
    s = exp.settings
    start = 0 if fresh else segments.latest_checkpoint(run_dir / CHECKPOINTS)
    step_s = None if fresh else measured_step_s(read_run_steps(run_dir)[0], _load_segments(run_dir))
    validations = (s.steps // s.test_freq - start // s.test_freq) + (start == 0)
    overhead = (cost.startup_s + validations * cost.validation_s
                + (s.steps - start) / s.save_freq * cost.checkpoint_s)
    finish = cost.eval_fixed_s + cost.sampling_s(exp.eval_questions * (exp.eval.samples + 1))
    end = segments.segment_end(start, s.steps, s.quantum, remaining_s=budget.remaining(), step_s=step_s or cost.step_s,
                               overhead_s=overhead, finish_s=finish)
    return start, end


def _record_segment(run_dir: Path, entry: dict[str, Any]) -> None:
    segs = [s for s in _load_segments(run_dir) if s["segment"] != entry["segment"]]
    write_json_atomic(run_dir / SEGMENTS_FILE, sorted([*segs, entry], key=lambda s: s["segment"]))


def _logs(run_dir: Path) -> list[Path]:
    return [run_dir / "collect.log", *sorted(run_dir.glob("main_ppo.*.log")), *segments.segment_paths(run_dir),
            run_dir / "eval" / "eval.log"]


def execute(exp: CollapseExperiment, run: RunSpec, inputs: Inputs, *, budget: Budget, cost: CostModel,
            redo_stale: bool = False, progress: Callable[[str], None] = print) -> str:
    """Advance one run as far as the budget allows: ``skipped`` | ``done`` | ``partial`` (stopped on a
    checkpoint by the budget) | ``deferred`` (nothing launched: no quantum fits) | ``failed``."""
    run_dir = run.dir(exp.out)
    tag = f"[{run.label} seed {run.seed}]"
    prints = run_fingerprints(exp, run, inputs)
    fingerprint = prints["fingerprint"]
    state = run_state(run_dir, **prints)
    if state == "done":
        return "skipped"
    if state == "stale" and not redo_stale:
        raise CollapseError(f"{run_dir} was made with other settings; use another --out, or --redo-stale")
    start, end = plan_segment(exp, run_dir, budget, cost, fresh=state != "resume")
    if start < exp.settings.steps and end == start:
        progress(f"{tag} not launched: the budget left does not pay for {exp.settings.quantum} more steps")
        return "deferred"

    dl = exp.deadlines
    with e2e_lock(LOCK_PATH, dl.lock_wait_s,
                  on_wait=lambda: progress(f"{tag} waiting for {LOCK_PATH} (another session's trainer or vLLM run)")):
        start, end = plan_segment(exp, run_dir, budget, cost, fresh=state != "resume")  # again: the wait took time
        if start < exp.settings.steps and end == start:
            progress(f"{tag} not launched: after the wait for the lock, the budget left does not pay for "
                     f"{exp.settings.quantum} more steps")
            return "deferred"
        if state != "resume" and run_dir.exists():
            shutil.rmtree(run_dir)  # stale (--redo-stale) or a launch killed before its spec: start clean
        if state == "resume":
            ray_stop(dl.ray_stop_s)  # a killed trainer may have left its Ray cluster behind
        run_dir.mkdir(parents=True, exist_ok=True)
        if state != "resume":
            write_json_atomic(run_dir / SPEC_FILE, {"fingerprint": prints["training_fingerprint"], **asdict(run),
                                                    "started": time.strftime("%Y-%m-%dT%H:%M:%S")})
        try:
            if run.method == "rlep" and not commands.rlep_pool_path(run_dir).is_file():
                progress(f"{tag} RLEP pool collection from the start model")
                result = _stage(collect_command(exp, run, run_dir, inputs), run_dir / "collect.log", cwd=run_dir,
                                env=child_env(inputs), deadline_s=dl.collect_s, stage="RLEP collection")
                write_json_atomic(run_dir / "collect.json", {"wall_s": round(result.wall_s, 1),
                                                             **_collect_summary(run_dir / "collect.log")})
            if start < exp.settings.steps:
                n = segments.next_segment(run_dir)
                cmd = trainer_command(exp, run, run_dir, inputs, resume_from=start, end_step=end, recipes=recipes_dir())
                progress(f"{tag} main_ppo {recipe(run)} segment {n}: steps {start + 1}..{end} of {exp.settings.steps}"
                         + (f" (resuming from global_step_{start})" if start else ""))
                entry = {"segment": n, "resumed_from": start, "end_step": end,
                         "started": time.strftime("%Y-%m-%dT%H:%M:%S"), "returncode": None, "commit": code_commit()}
                _record_segment(run_dir, entry)  # a kill leaves this entry without a wall time
                try:
                    result = run_logged(cmd, run_dir / f"main_ppo.{n}.log", cwd=run_dir,
                                        env=child_env(inputs, segments.segment_path(run_dir, n)),
                                        deadline_s=dl.train_s(end - start))
                finally:
                    ray_stop(dl.ray_stop_s)  # Ray outlives a killed driver; we still hold the lock
                _record_segment(run_dir, {**entry, "returncode": result.returncode, "wall_s": round(result.wall_s, 1),
                                          "first_step_s": result.first_step_s,
                                          "command": [Path(cmd[0]).name, *cmd[1:]]})
                if result.returncode != 0:
                    why = f"deadline {dl.train_s(end - start):.0f}s passed" if result.timed_out else f"rc {result.returncode}"
                    raise StepFailed("main_ppo", result, run_dir / f"main_ppo.{n}.log",
                                     f"main_ppo failed ({why}); log: {run_dir / f'main_ppo.{n}.log'}")
                reached = segments.latest_checkpoint(run_dir / CHECKPOINTS)
                if reached < exp.settings.steps:
                    progress(f"{tag} stopped at the checkpoint of step {reached} (budget); resumes from there")
                    return "partial"
            progress(f"{tag} evaluation on {exp.eval_split} (first {exp.eval_questions} questions)")
            (run_dir / "eval").mkdir(exist_ok=True)
            ev = _stage(eval_command(exp, run, run_dir, inputs), run_dir / "eval" / "eval.log", cwd=run_dir,
                        env=child_env(inputs), deadline_s=dl.eval_s, stage="evaluation")
        except StepFailed as exc:
            write_json_atomic(run_dir / FAILED_FILE, {"stage": exc.stage, "error": str(exc),
                                                     "returncode": exc.result.returncode if exc.result else None,
                                                     "log_tail": _tail(exc.log)})
            progress(f"{tag} FAILED (checkpoints kept: the next launch resumes): {exc}")
            return "failed"
    record = finish(exp, run, run_dir, fingerprint, inputs, eval_wall_s=ev.wall_s)
    progress(f"{tag} done: greedy {record['eval'].get('greedy', float('nan')):.3f}, "
             f"pass@64 {record['eval'].get('pass@64', float('nan')):.3f}, "
             f"step {record['timing']['steady_step_s'] or float('nan'):.1f}s, wall {record['timing']['total_wall_s']:.0f}s")
    return "done"


def finish(exp: CollapseExperiment, run: RunSpec, run_dir: Path, fingerprint: str, inputs: Inputs, *,
           eval_wall_s: float) -> dict[str, Any]:
    """Write run.json (last: it marks the run finished), then delete what is large and reproducible."""
    steps, warnings = read_run_steps(run_dir)
    segs = _load_segments(run_dir)
    collect = json.loads((run_dir / "collect.json").read_text()) if (run_dir / "collect.json").is_file() else {}
    train_wall = sum(s.get("wall_s") or 0.0 for s in segs)
    startups = [s["first_step_s"] - steps[s["resumed_from"] + 1]["timing_s/step"] for s in segs
                if s.get("first_step_s") is not None and "timing_s/step" in steps.get(s["resumed_from"] + 1, {})]
    timing = {
        "steady_step_s": measured_step_s(steps, segs),
        "startup_s": statistics.fmean(startups) if startups else None,
        "segments": len(segs),
        # a resumed collection: this launch's wall + what its earlier launches' finished chunks took
        "collect_s": round(collect.get("wall_s", 0.0) + (collect.get("resumed_chunk_s") or 0.0), 1),
        "train_wall_s": round(train_wall, 1),  # every launch: start-up, steps, validations, checkpoints
        "eval_wall_s": round(eval_wall_s, 1),
    }
    timing["total_wall_s"] = round(timing["collect_s"] + train_wall, 1)  # the method's cost; eval is measurement
    if collect.get("resumed_questions") and collect.get("resumed_chunk_s") is None:
        timing["collect_untimed_questions"] = collect["resumed_questions"]  # collect_s leaves them out
    last = segs[-1]["command"] if segs and segs[-1].get("command") else []
    record = {
        "label": run.label, "method": run.method, "seed": run.seed, "kind": exp.kind, "task": "smollm2_arith",
        "status": "done", "fingerprint": fingerprint, "recipe": recipe(run), "extra_overrides": list(run.extra),
        "settings": asdict(exp.settings), "eval_settings": {**asdict(exp.eval), "questions": exp.eval_questions},
        "command": last, "model": {k: inputs.model_manifest.get(k) for k in ("source", "parameters")},
        "data": inputs.data_manifest,
        "rlep_pool": "collected once per seed from the start model (SmolLM2-135M-Instruct)" if run.method == "rlep" else None,
        "eval": eval_summary(run_dir / "eval", exp.eval.ks), "collect": collect, "timing": timing,
        "segments": [{k: s.get(k) for k in ("segment", "resumed_from", "end_step", "wall_s", "returncode", "commit")} for s in segs],
        "steps_warnings": warnings, "steps_logged": len(steps), "steps": kept_steps(steps),
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    Cleanup(run_dir)()
    (run_dir / FAILED_FILE).unlink(missing_ok=True)  # an earlier launch's failure, since resumed
    shutil.rmtree(run_dir / "eval" / "merged_model", ignore_errors=True)  # the eval CLI's merge of the shards
    for log in _logs(run_dir):
        gzip_file(log)
    write_json_atomic(run_dir / RUN_FILE, record)
    return record


# ------------------------------------------------------------------------------------------------
# the launcher
# ------------------------------------------------------------------------------------------------


def describe(exp: CollapseExperiment, inputs: Inputs, cost: CostModel, budget: Budget,
             progress: Callable[[str], None]) -> None:
    """--dry-run: every run's state and the command line of its next launch."""
    recipes = recipes_dir()
    for run in exp.runs:
        run_dir = run.dir(exp.out)
        state = run_state(run_dir, **run_fingerprints(exp, run, inputs))
        if state in ("done", "stale"):
            progress(f"  {run.label}/seed{run.seed}: {state}")
            continue
        start, end = plan_segment(exp, run_dir, budget, cost, fresh=state != "resume")
        progress(f"  {run.label}/seed{run.seed}: {state}, checkpoint {start}, next segment to step {end}")
        n = segments.next_segment(run_dir) if state == "resume" else 0
        if start < exp.settings.steps:
            cmd = trainer_command(exp, run, run_dir, inputs, resume_from=start, end_step=end, recipes=recipes)
            progress(f"    {FILE_LOGGER_ENV}={segments.segment_path(run_dir, n)} " + " ".join(cmd))


def launch(exp: CollapseExperiment, *, cost: CostModel, budget_min: float | None = None, dry_run: bool = False,
           redo_stale: bool = False, progress: Callable[[str], None] = print) -> int:
    budget = Budget(None if budget_min is None else time.monotonic() + 60 * budget_min)
    est = cost.experiment_s(exp)
    progress(f"{exp.kind}: {len(exp.runs)} runs in {exp.out}; estimate {est['total_s'] / 3600:.1f} h from scratch "
             f"at {cost.step_s:.0f} s/step (`estimate` for the arithmetic)")
    inputs = prepare_inputs(exp, progress)
    if dry_run:
        describe(exp, inputs, cost, budget, progress)
        return 0
    exp.out.mkdir(parents=True, exist_ok=True)
    (exp.out / ".gitignore").write_text("# large and reproducible: never committed\ncheckpoints/\n*.parquet\n"
                                        "generations.jsonl\nmerged_model/\n")
    outcomes: dict[str, int] = {}
    t0 = time.monotonic()
    for i, run in enumerate(exp.runs, 1):
        progress(f"({i}/{len(exp.runs)}) {run.label} seed {run.seed} [{(time.monotonic() - t0) / 60:.1f} min elapsed]")
        outcome = execute(exp, run, inputs, budget=budget, cost=cost, redo_stale=redo_stale, progress=progress)
        outcomes[outcome] = outcomes.get(outcome, 0) + 1
        if outcome in ("partial", "deferred"):
            break  # the budget is spent: later runs would not fit either
    left = len(exp.runs) - outcomes.get("done", 0) - outcomes.get("skipped", 0)
    progress(f"{exp.kind}: {(time.monotonic() - t0) / 60:.1f} min, " + ", ".join(f"{n} {k}" for k, n in sorted(outcomes.items()))
             + (f"; {left} run(s) not finished: run the same command again to continue" if left else ""))
    return 1 if outcomes.get("failed") else 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m dyjr_verl.experiments.collapse", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="the main comparison, several seeds, evaluated on the test split")
    r.add_argument("--methods", nargs="+", default=list(MAIN_METHODS))
    r.add_argument("--seeds", type=int, nargs="+", default=list(DEFAULT_SEEDS))
    r.add_argument("--out", type=Path, default=Path("results/collapse/runs"))
    a = sub.add_parser("ablation", help="one factor at a time, one seed, validation slice only")
    a.add_argument("--variants", nargs="+", default=list(ABLATIONS))
    a.add_argument("--seed", type=int, default=0)
    a.add_argument("--out", type=Path, default=Path("results/collapse/ablation"))
    e = sub.add_parser("estimate", help="the cost arithmetic of the default plan (no run)")
    for p in (r, a, e):
        p.add_argument("--steps", type=int, default=CollapseSettings.steps, help="training steps per run")
        p.add_argument("--step-s", type=float, default=CostModel.step_s,
                       help="seconds per training step for estimates and the budget before a run has measured its own")
        p.add_argument("--data", type=Path, default=DEFAULT_DATA_DIR,
                       help=f"word problems (built there if missing; default {DEFAULT_DATA_DIR})")
    e.add_argument("--tokens-per-s", type=float, default=CostModel.tokens_per_s)
    for p in (r, a):
        p.add_argument("--budget-min", type=float, default=None,
                       help="launch nothing that would not end, on a checkpoint, within this many minutes")
        p.add_argument("--dry-run", action="store_true", help="print the plan and the next trainer command lines only")
        p.add_argument("--redo-stale", action="store_true", help="start afresh runs made with other settings")
    rep = sub.add_parser("report", help="results/collapse/README.md and the plots")
    rep.add_argument("--runs", type=Path, default=Path("results/collapse/runs"))
    rep.add_argument("--ablation", type=Path, default=Path("results/collapse/ablation"))
    rep.add_argument("--out", type=Path, default=Path("results/collapse"))
    return parser


def experiment_from_args(args: argparse.Namespace) -> CollapseExperiment:
    if args.steps < 1:
        raise CollapseError(f"--steps must be >= 1, got {args.steps}")
    if args.step_s <= 0:
        raise CollapseError(f"--step-s must be > 0, got {args.step_s}")
    if getattr(args, "budget_min", None) is not None and args.budget_min <= 0:
        raise CollapseError(f"--budget-min must be > 0, got {args.budget_min}")
    settings = CollapseSettings(steps=args.steps)
    kw = {"data_dir": args.data.expanduser().resolve()}
    if args.cmd == "ablation":
        unknown = [v for v in args.variants if v not in ABLATIONS]
        if unknown:
            raise CollapseError(f"unknown variant(s) {unknown}; choose from {list(ABLATIONS)}")
        return ablation(args.out.resolve(), list(dict.fromkeys(args.variants)), args.seed, settings, **kw)
    methods = getattr(args, "methods", list(MAIN_METHODS))
    seeds = getattr(args, "seeds", list(DEFAULT_SEEDS))
    unknown = [m for m in methods if m not in MAIN_METHODS]
    if unknown:
        raise CollapseError(f"unknown method(s) {unknown}; choose from {list(MAIN_METHODS)}")
    if len(set(seeds)) != len(seeds) or any(s < 0 for s in seeds):
        raise CollapseError(f"--seeds must be distinct non-negative integers, got {seeds}")
    out = getattr(args, "out", Path("results/collapse/runs")).resolve()
    return comparison(out, list(dict.fromkeys(methods)), seeds, settings, **kw)


def estimate_text(cost: CostModel, steps: int, data: Path) -> str:
    settings = CollapseSettings(steps=steps)
    main_exp = comparison(Path("runs"), list(MAIN_METHODS), list(DEFAULT_SEEDS), settings, data_dir=data)
    abl_exp = ablation(Path("ablation"), list(ABLATIONS), 0, settings, data_dir=data)
    lines = [f"rates: {cost.step_s:g} s/step, {cost.tokens_per_s:g} generated tokens/s, {cost.response_tokens:g} tokens "
             f"per sample, start-up {cost.startup_s:g} s, checkpoint {cost.checkpoint_s:g} s, RLEP collection "
             f"{cost.collect_tokens_per_s:g} tokens/s (top-p sampling)",
             f"settings: {steps} steps, checkpoint every {settings.save_freq}, held-out mean@{settings.val_k} on "
             f"{settings.val_questions} val questions every {settings.test_freq} steps ({cost.validations(settings)} "
             f"validations), test evaluation on {main_exp.eval_questions} questions x 65 samples", ""]
    total = 0.0
    for name, exp in (("main comparison", main_exp), ("ablations", abl_exp)):
        est = cost.experiment_s(exp)
        total += est["total_s"]
        per = ", ".join(f"{k} {v / 60:.1f}" for k, v in est["per_run"].items())
        lines.append(f"{name}: {est['runs']} runs x ({per}) min"
                     + (f" + {est['rlep_collections']} RLEP collections x {est['collect_s'] / 60:.1f} min"
                        if est["rlep_collections"] else "") + f" = {est['total_s'] / 3600:.1f} h")
    lines.append(f"total: {total / 3600:.1f} h")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.cmd == "report":
            from dyjr_verl.analysis.collapse_report import write_collapse_report

            readme = write_collapse_report(args.runs, args.out, args.ablation)
            print(f"written: {readme} (+ plots in {args.out})")
            return 0
        exp = experiment_from_args(args)
        if args.cmd == "estimate":
            if args.tokens_per_s <= 0:
                raise CollapseError(f"--tokens-per-s must be > 0, got {args.tokens_per_s}")
            print(estimate_text(CostModel(step_s=args.step_s, tokens_per_s=args.tokens_per_s), args.steps, exp.data_dir))
            return 0
        return launch(exp, cost=CostModel(step_s=args.step_s), budget_min=args.budget_min, dry_run=args.dry_run,
                      redo_stale=args.redo_stale, progress=lambda s: print(s, flush=True))
    except (CollapseError, LockTimeout, StepsError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
