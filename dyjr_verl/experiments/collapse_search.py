"""Search for the collapse regime (issue 15, step 4): one resumable GRPO run of ``grpo_smollm2_cpu``.

    python -m dyjr_verl.experiments.collapse_search run NAME --steps N [--set KEY=VALUE ...]
    python -m dyjr_verl.experiments.collapse_search summary NAME [NAME ...]

``run`` starts (or resumes) ``python -m verl.trainer.main_ppo --config-name grpo_smollm2_cpu`` under
``flock /tmp/dyjr_e2e.lock`` and ``nice -n 10``, with a deadline. Checkpoints go to
``--ckpt-root/NAME`` (outside ``results/``, never committed); verl's ``resume_mode=auto`` continues
from the latest one, so calling ``run`` again with a larger ``--steps`` extends the run. verl's file
logger truncates its file, so every segment writes ``metrics.seg<K>.jsonl`` and the segments are
merged (a later segment wins a step) into ``OUT/NAME/metrics.jsonl``. ``summary`` prints the
search table row of each run: entropy and Rank-1 at steps 1/10/20/30, reward, step time.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import sys
import time
from pathlib import Path

from dyjr_verl.analysis.steps import FILE_LOGGER_ENV, METRICS_FILE, read_steps
from dyjr_verl.experiments.config import LOCK_PATH
from dyjr_verl.experiments.process import e2e_lock, ray_stop, run_logged
from dyjr_verl.recipes import recipes_dir

RECIPE = "grpo_smollm2_cpu"
MARK_STEPS = (1, 10, 20, 30)
ENTROPY, RANK1, REWARD, STEP_S = "actor/entropy", "rank_k/p1", "critic/score/mean", "timing_s/step"


def trainer_command(name: str, steps: int, ckpt: Path, sets: list[str]) -> list[str]:
    return ["nice", "-n", "10", sys.executable, "-m", "verl.trainer.main_ppo", "--config-path", str(recipes_dir()),
            "--config-name", RECIPE, f"trainer.total_training_steps={steps}", f"trainer.default_local_dir={ckpt}",
            f"trainer.experiment_name=collapse_{name}", "trainer.resume_mode=auto",
            "hydra.run.dir=.", "hydra.output_subdir=null", *sets]


def merge_segments(run_dir: Path) -> dict[int, dict[str, float]]:
    steps: dict[int, dict[str, float]] = {}
    for seg in sorted(run_dir.glob("metrics.seg*.jsonl"), key=lambda p: int(p.name[len("metrics.seg"):-len(".jsonl")])):
        if seg.stat().st_size:
            steps.update(read_steps(seg))
    with (run_dir / METRICS_FILE).open("w") as fh:
        for step in sorted(steps):
            fh.write(json.dumps({"step": step, "data": steps[step]}) + "\n")
    return steps


def run(args: argparse.Namespace) -> int:
    run_dir = (args.out / args.name).resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    seg = len(list(run_dir.glob("metrics.seg*.jsonl")))
    cmd = trainer_command(args.name, args.steps, (args.ckpt_root / args.name).resolve(), args.set)
    env = {**os.environ, FILE_LOGGER_ENV: str(run_dir / f"metrics.seg{seg}.jsonl"), "RAY_DEDUP_LOGS": "0",
           "HYDRA_FULL_ERROR": "1", "PYTHONUNBUFFERED": "1"}
    with (run_dir / "commands.txt").open("a") as fh:
        fh.write(f"# segment {seg}, {time.strftime('%Y-%m-%dT%H:%M:%S')}, PYTHONPATH={env.get('PYTHONPATH', '')}\n"
                 + shlex.join(cmd) + "\n")
    print(f"[{args.name}] segment {seg}: waiting for {LOCK_PATH}", flush=True)
    with e2e_lock(LOCK_PATH, 4 * 3600.0) as waited:
        print(f"[{args.name}] lock after {waited:.0f}s; main_ppo to step {args.steps}", flush=True)
        result = run_logged(cmd, run_dir / f"main_ppo.seg{seg}.log", cwd=run_dir, env=env,
                            deadline_s=args.deadline_min * 60)
        if result.returncode != 0:
            ray_stop()  # a killed trainer leaves Ray behind; we still hold the lock
    steps = merge_segments(run_dir)
    print(f"[{args.name}] rc {result.returncode}, {result.wall_s:.0f}s wall, first step after "
          f"{result.first_step_s or float('nan'):.0f}s, steps logged {len(steps)}", flush=True)
    print(summary_row(args.name, steps))
    return 0 if result.returncode == 0 else 1


def _at(steps: dict[int, dict[str, float]], key: str, step: int) -> str:
    v = steps.get(step, {}).get(key)
    return "–" if v is None else f"{v:.3f}"


def summary_row(name: str, steps: dict[int, dict[str, float]]) -> str:
    times = [steps[s][STEP_S] for s in sorted(steps)[1:] if STEP_S in steps[s]]
    steady = sorted(times)[len(times) // 2] if times else float("nan")  # median: checkpoint steps are slower
    cells = [name, str(max(steps, default=0)), f"{steady:.1f}"]
    for key in (ENTROPY, RANK1, REWARD):
        cells.append(" / ".join(_at(steps, key, s) for s in MARK_STEPS))
    return "| " + " | ".join(cells) + " |"


def summary(args: argparse.Namespace) -> int:
    print("| run | steps | median step s | entropy @1/10/20/30 | Rank-1 @1/10/20/30 | reward @1/10/20/30 |")
    print("|---|---|---|---|---|---|")
    for name in args.names:
        print(summary_row(name, read_steps(args.out / name / METRICS_FILE)))
    return 0


def main(argv: list[str] | None = None) -> int:
    # SIGTERM as SystemExit: run_logged then kills the trainer's process group instead of orphaning it
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    parser = argparse.ArgumentParser(prog="python -m dyjr_verl.experiments.collapse_search", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("results/collapse/search"))
    sub = parser.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="start or resume one GRPO run")
    r.add_argument("name")
    r.add_argument("--steps", type=int, required=True, help="train up to this global step (resumes from the last checkpoint)")
    r.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="hydra override (repeatable)")
    r.add_argument("--ckpt-root", type=Path, default=Path("/tmp/collapse_ckpt"))
    r.add_argument("--deadline-min", type=float, default=25.0)
    s = sub.add_parser("summary", help="the search table rows")
    s.add_argument("names", nargs="+")
    args = parser.parse_args(argv)
    if args.cmd == "run" and args.steps < 1:
        print(f"error: --steps must be >= 1, got {args.steps}", file=sys.stderr)
        return 2
    return run(args) if args.cmd == "run" else summary(args)


if __name__ == "__main__":
    sys.exit(main())
