"""Miniature reproduction (issue 7): GRPO vs DyJR vs RLEP vs Ex-GRPO on the embedded arithmetic task.

    python -m dyjr_verl.experiments.mini run [--seeds 0 1 2] [--methods grpo dyjr rlep exgrpo] \\
        [--steps N] [--out results/mini/runs] [--dry-run] [--redo-stale]
    python -m dyjr_verl.experiments.mini ablation [--seed 0] [--variants ...] [--steps N] \\
        [--out results/mini/ablation]
    python -m dyjr_verl.analysis.report --runs results/mini/runs --out results/mini
    (either command with --task sql: the same on the embedded Text-to-SQL task, in results/mini_sql)

``run``: builds (or reuses) the warm start (``python -m dyjr_verl.assets warmstart``), then for every
seed and method, sequentially: RLEP's pool collection on the warm-start model (RLEP only, once per
seed, its time counted in RLEP's cost), ``python -m verl.trainer.main_ppo`` with the method's
``*_tiny_cpu`` recipe and the shared overrides, a final checkpoint, and the evaluation on the
held-out test split (greedy, 32 samples: avg@8, pass@1/8/32, distinct correct, Rank-k on the samples).
Each run holds ``/tmp/dyjr_e2e.lock`` (flock, shared with other sessions' end-to-end runs) from
collection to evaluation; every wait has a deadline. A finished run (``run.json``) is skipped; a
partial one is wiped and redone. ``ablation``: DyJR one factor at a time (buffer age, lambda, admit
filter) plus GRPO, one seed, evaluated on the validation slice of train, never on test.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

from dyjr_verl.recipes import recipes_dir
from dyjr_verl.analysis.steps import METRICS_FILE, StepsError, file_logger_env, read_steps
from dyjr_verl.assets.warmstart import WarmStartSpec
from dyjr_verl.experiments import commands
from dyjr_verl.experiments.config import (
    ABLATION_VARIANTS,
    DEFAULT_SEEDS,
    DEFAULT_STEPS,
    LOCK_PATH,
    METHODS,
    Experiment,
    RunSpec,
    TASKS,
    SharedSettings,
    ablation,
    comparison,
)
from dyjr_verl.experiments.process import (
    LockTimeout,
    ProcResult,
    e2e_lock,
    ray_stop,
    run_logged,
)
from dyjr_verl.experiments.records import (
    FAILED_FILE,
    RUN_FILE,
    Cleanup,
    RunState,
    eval_summary,
    gzip_file,
    keep_metrics,
    run_state,
    timing,
    write_json_atomic,
)


class MiniError(ValueError):
    """Bad input or a refused action: one ``error:`` line, exit code 2."""


class StepFailed(RuntimeError):
    def __init__(self, stage: str, result: ProcResult | None, log: Path | None, message: str = ""):
        super().__init__(message or f"{stage} failed (rc {result.returncode if result else '?'})")
        self.stage, self.result, self.log = stage, result, log


def _tail(path: Path | None, n: int = 3000) -> str:
    if path is None or not path.is_file():
        return ""
    return path.read_text(errors="replace")[-n:]


def _child_env(assets: Path) -> dict[str, str]:
    return {**os.environ, "DYJR_ASSETS_DIR": str(assets), "RAY_DEDUP_LOGS": "0", "HYDRA_FULL_ERROR": "1",
            "PYTHONUNBUFFERED": "1"}  # step lines arrive when they happen: the start-up time is read from them


def plan(exp: Experiment) -> list[tuple[RunSpec, RunState]]:
    return [(r, run_state(r.dir(exp.out), exp.fingerprint(r))) for r in exp.runs]


def _stage(cmd: list[str], log: Path, *, cwd: Path, env: dict[str, str], deadline_s: float, stage: str) -> ProcResult:
    result = run_logged(cmd, log, cwd=cwd, env=env, deadline_s=deadline_s)
    if result.returncode != 0:
        why = f"deadline {deadline_s:.0f}s passed" if result.timed_out else f"rc {result.returncode}"
        raise StepFailed(stage, result, log, f"{stage} failed ({why}); log: {log}")
    return result


def _train_steps(run_dir: Path, result: ProcResult, progress: Callable[[str], None], tag: str):
    """Per-step metrics of the finished trainer: its file logger's JSON lines, else (a trainer that
    logged no ``file``) its console log, with a warning. Returns (steps, the file they came from)."""
    source = run_dir / METRICS_FILE
    if not source.is_file():
        progress(f"{tag} warning: no {source.name} (trainer.logger without `file`); per-step metrics from the console log")
        source = run_dir / "main_ppo.log"
    try:
        return read_steps(source), source.name
    except StepsError as exc:
        raise StepFailed("main_ppo", result, source, str(exc)) from None


def _logs(run_dir: Path) -> tuple[Path, ...]:
    """Kept gzipped once the run is over."""
    return (run_dir / "collect.log", run_dir / "main_ppo.log", run_dir / METRICS_FILE, run_dir / "eval" / "eval.log")


def _collect_summary(log: Path) -> dict[str, Any]:
    for line in reversed(log.read_text(errors="replace").splitlines()):
        if line.startswith("rlep_collect: {"):
            return json.loads(line[len("rlep_collect: "):])
    return {}


def execute(exp: Experiment, run: RunSpec, *, recipes: Path, warm: dict[str, Any],
            progress: Callable[[str], None] = print) -> str:
    """One run, start to record: ``skipped`` | ``done`` | ``failed``."""
    run_dir = run.dir(exp.out)
    fingerprint = exp.fingerprint(run)
    state = run_state(run_dir, fingerprint)
    if state is RunState.DONE:
        return "skipped"
    assets = Path(warm["root"])
    env = _child_env(assets)
    dl = exp.deadlines
    def on_wait() -> None:
        progress(f"[{run.label} seed {run.seed}] waiting for {LOCK_PATH} (another session's trainer or vLLM run; "
                 f"at most {dl.lock_wait_s / 60:.0f} min)")

    with e2e_lock(LOCK_PATH, dl.lock_wait_s, on_wait=on_wait) as waited:
        if run_dir.exists():
            shutil.rmtree(run_dir)  # partial or stale: start clean, never from its leftovers
        run_dir.mkdir(parents=True)
        if state is not RunState.TODO:
            ray_stop(dl.ray_stop_s)  # a killed trainer may have left its Ray cluster behind
        results: dict[str, ProcResult] = {}
        collect: dict[str, Any] = {}
        train_cmd = commands.trainer_command(exp, run, run_dir, recipes)
        try:
            if run.method == "rlep":
                progress(f"[{run.label} seed {run.seed}] RLEP pool collection")
                results["collect"] = _stage(commands.collect_command(exp, run, run_dir, assets), run_dir / "collect.log",
                                            cwd=run_dir, env=env, deadline_s=dl.collect_s, stage="RLEP collection")
                collect = _collect_summary(run_dir / "collect.log")
            progress(f"[{run.label} seed {run.seed}] main_ppo {run.recipe}, {exp.shared.steps} steps")
            try:
                results["train"] = _stage(train_cmd, run_dir / "main_ppo.log", cwd=run_dir,
                                          env={**env, **file_logger_env(run_dir)},
                                          deadline_s=dl.train_s(exp.shared.steps), stage="main_ppo")
            finally:
                ray_stop(dl.ray_stop_s)  # Ray outlives a killed driver; we still hold the lock
            steps, steps_source = _train_steps(run_dir, results["train"], progress, f"[{run.label} seed {run.seed}]")
            ckpt = commands.checkpoint_dir(run_dir, exp.shared.steps)
            if not ckpt.is_dir():
                raise StepFailed("main_ppo", results["train"], run_dir / "main_ppo.log", f"no checkpoint at {ckpt}")
            progress(f"[{run.label} seed {run.seed}] evaluation on {exp.eval.split}")
            (run_dir / "eval").mkdir()
            results["eval"] = _stage(commands.eval_command(exp, run, run_dir, assets), run_dir / "eval" / "eval.log",
                                     cwd=run_dir, env=env, deadline_s=dl.eval_s, stage="evaluation")
        except StepFailed as exc:
            write_json_atomic(run_dir / FAILED_FILE, {"stage": exc.stage, "error": str(exc),
                                                     "returncode": exc.result.returncode if exc.result else None,
                                                     "log_tail": _tail(exc.log)})
            for log in _logs(run_dir):
                gzip_file(log)
            Cleanup(run_dir)()
            progress(f"[{run.label} seed {run.seed}] FAILED: {exc}")
            return "failed"

    t = timing(steps, results["train"].first_step_s)
    t.update({
        "lock_wait_s": round(waited, 1),
        "collect_s": round(results["collect"].wall_s, 1) if "collect" in results else 0.0,
        "train_wall_s": round(results["train"].wall_s, 1),  # launch to exit: start-up, steps, checkpoint
        "eval_wall_s": round(results["eval"].wall_s, 1),
    })
    t["total_wall_s"] = round(t["collect_s"] + t["train_wall_s"], 1)  # the method's cost (eval is measurement)
    record = {
        "label": run.label, "method": run.method, "seed": run.seed, "kind": exp.kind, "task": exp.task, "status": "done",
        "fingerprint": fingerprint, "recipe": run.recipe, "extra_overrides": list(run.extra),
        "shared": asdict(exp.shared), "eval_settings": asdict(exp.eval),
        "command": [Path(train_cmd[0]).name, *train_cmd[1:]],
        "warmstart": {k: warm[k] for k in ("root", "key", "steps", "val", "test") if k in warm},
        "eval": eval_summary(run_dir / "eval", exp.eval.ks),
        "collect": collect, "timing": t, "steps_logged": len(steps), "steps_source": steps_source,
        "steps": keep_metrics(steps),
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    Cleanup(run_dir)()
    for log in _logs(run_dir):
        gzip_file(log)
    write_json_atomic(run_dir / RUN_FILE, record)  # last: its presence marks the run finished
    e = record["eval"]
    progress(f"[{run.label} seed {run.seed}] done: greedy {e.get('greedy', float('nan')):.3f}, "
             f"pass@{exp.eval.samples} {e.get(f'pass@{exp.eval.samples}', float('nan')):.3f}, "
             f"step {t['steady_step_s'] or float('nan'):.2f}s, train wall {t['train_wall_s']:.0f}s, eval {t['eval_wall_s']:.0f}s")
    return "done"


def _warm_start(exp: Experiment, progress: Callable[[str], None]) -> dict[str, Any]:
    from dyjr_verl.assets.warmstart import warm_start

    result = warm_start(exp.warmstart, progress=progress)
    return {"root": str(result.root), "key": exp.warmstart.key(), "steps": result.steps, "val": result.val,
            "test": result.test}


def launch(exp: Experiment, *, redo_stale: bool = False, dry_run: bool = False,
           progress: Callable[[str], None] = print) -> int:
    states = plan(exp)
    stale = [r for r, s in states if s is RunState.STALE]
    if stale and not redo_stale:
        names = ", ".join(f"{r.label}/seed{r.seed}" for r in stale)
        raise MiniError(f"{exp.out}: {names} finished with other settings (steps, eval or warm start); "
                        "use another --out, or --redo-stale to replace them")
    todo = [r for r, s in states if s is not RunState.DONE]
    progress(f"{exp.kind}: {len(exp.runs)} runs in {exp.out}, {len(exp.runs) - len(todo)} finished, {len(todo)} to run")
    if dry_run:
        recipes = recipes_dir()
        for r, s in states:
            progress(f"  {r.label}/seed{r.seed}: {s.value}")
            if s is not RunState.DONE:
                env = " ".join(f"{k}={v}" for k, v in file_logger_env(r.dir(exp.out)).items())
                progress(f"    {env} " + " ".join(commands.trainer_command(exp, r, r.dir(exp.out), recipes)))
        return 0
    warm = _warm_start(exp, progress)
    progress(f"warm start {warm['root']}: validation greedy {warm['val']['greedy']:.3f}, "
             f"held-out greedy {warm['test']['greedy']:.3f}, pass@{warm['test']['k']} {warm['test']['pass_at_k']:.3f}")
    exp.out.mkdir(parents=True, exist_ok=True)
    (exp.out / ".gitignore").write_text("# large and reproducible: never committed\ncheckpoints/\n*.parquet\ngenerations.jsonl\n")
    recipes = recipes_dir()
    outcomes: dict[str, int] = {}
    t0 = time.monotonic()
    for i, run in enumerate(exp.runs, 1):
        progress(f"({i}/{len(exp.runs)}) {run.label} seed {run.seed} [{(time.monotonic() - t0) / 60:.1f} min elapsed]")
        outcome = execute(exp, run, recipes=recipes, warm=warm, progress=progress)
        outcomes[outcome] = outcomes.get(outcome, 0) + 1
    progress(f"{exp.kind} finished in {(time.monotonic() - t0) / 60:.1f} min: "
             + ", ".join(f"{n} {k}" for k, n in sorted(outcomes.items())))
    return 1 if outcomes.get("failed") else 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m dyjr_verl.experiments.mini", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="GRPO vs DyJR vs RLEP vs Ex-GRPO, several seeds, evaluated on the test split")
    r.add_argument("--seeds", type=int, nargs="+", default=list(DEFAULT_SEEDS))
    r.add_argument("--methods", nargs="+", default=list(METHODS))
    r.add_argument("--out", type=Path, default=None, help="default results/mini/runs (sql: results/mini_sql/runs)")
    a = sub.add_parser("ablation", help="DyJR buffer age / lambda / admit filter, one seed, on the validation slice")
    a.add_argument("--seed", type=int, default=0)
    a.add_argument("--variants", nargs="+", default=list(ABLATION_VARIANTS))
    a.add_argument("--out", type=Path, default=None, help="default results/mini/ablation (sql: results/mini_sql/ablation)")
    for p in (r, a):
        p.add_argument("--task", choices=list(TASKS), default="arith",
                       help="embedded task: arith (the miniature reproduction) or sql (Text-to-SQL, its own warm start)")
        p.add_argument("--steps", type=int, default=DEFAULT_STEPS, help=f"training steps per run (default {DEFAULT_STEPS})")
        p.add_argument("--dry-run", action="store_true", help="print the plan and the trainer command lines only")
        p.add_argument("--redo-stale", action="store_true", help="replace finished runs made with other settings")
    return parser


def experiment_from_args(args: argparse.Namespace) -> Experiment:
    if args.steps < 1:
        raise MiniError(f"--steps must be >= 1, got {args.steps}")
    task = TASKS[args.task]
    shared = SharedSettings(steps=args.steps, max_response_length=task.max_response_length)
    kw = {"task": task.name, "warmstart": WarmStartSpec.for_task(task.name)}
    root = Path("results/mini" if task.name == "arith" else f"results/mini_{task.name}")
    out = (args.out or root / ("runs" if args.cmd == "run" else "ablation")).resolve()
    if args.cmd == "run":
        unknown = [m for m in args.methods if m not in METHODS]
        if unknown:
            raise MiniError(f"unknown method(s) {unknown}; choose from {list(METHODS)}")
        if len(set(args.seeds)) != len(args.seeds) or any(s < 0 for s in args.seeds):
            raise MiniError(f"--seeds must be distinct non-negative integers, got {args.seeds}")
        return comparison(out, list(dict.fromkeys(args.methods)), args.seeds, shared, **kw)
    unknown = [v for v in args.variants if v not in ABLATION_VARIANTS]
    if unknown:
        raise MiniError(f"unknown variant(s) {unknown}; choose from {list(ABLATION_VARIANTS)}")
    return ablation(out, list(dict.fromkeys(args.variants)), args.seed, shared, **kw)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        exp = experiment_from_args(args)
        return launch(exp, redo_stale=args.redo_stale, dry_run=args.dry_run, progress=lambda s: print(s, flush=True))
    except (MiniError, LockTimeout) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
