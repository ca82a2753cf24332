"""Helpers for the end-to-end tests: run verl's own trainer (``python -m verl.trainer.main_ppo``)
on the tiny CPU recipes in a subprocess, with a deadline, and read its per-step metrics from verl's
file logger (``<workdir>/metrics.jsonl``).

Every run holds the machine-wide lock ``/tmp/dyjr_e2e.lock`` (the one the experiments and
benchmarks take), from launch to the ``ray stop`` after it: a test run never shares the 2 cores with
another trainer, and its ``ray stop --force`` never kills the Ray cluster of an experiment that is
running meanwhile. A test that finds the lock busy says so on the console and waits."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from dyjr_verl.analysis.steps import FILE_LOGGER_ENV, file_logger_env, read_steps
from dyjr_verl.experiments.config import LOCK_PATH
from dyjr_verl.experiments.process import e2e_lock, ray_stop

REPO_ROOT = Path(__file__).resolve().parents[1]
RECIPES = REPO_ROOT / "dyjr_verl" / "recipes"
RUN_DEADLINE_S = 900  # a tiny run takes 2-4 minutes on 2 cores; anything past this is a hang
LOCK = LOCK_PATH
LOCK_WAIT_S = 3 * 3600  # an experiment's run holds the lock for up to ~80 min (RLEP's collection + training)
CAPTURE = None  # pytest's capture manager, set by conftest.py's pytest_configure


@dataclass
class Run:
    returncode: int
    log: str  # console output
    log_path: Path
    metrics_path: Path  # the file logger's JSON lines
    steps: dict[int, dict[str, float]]  # read from metrics_path ({} when the trainer wrote none)

    def tail(self, n: int = 6000) -> str:
        return self.log[-n:]


def machine_lock():
    """The machine-wide trainer lock (module docstring), for any test step that runs vLLM or a trainer
    or builds the tiny assets (their supervised warm start)."""

    def say_waiting() -> None:  # past pytest's output capture, so the wait is seen while it lasts
        with CAPTURE.global_and_fixture_disabled() if CAPTURE else contextlib.nullcontext():
            print(f"\n[e2e] {LOCK} is held by another trainer run (an experiment?); waiting up to "
                  f"{LOCK_WAIT_S // 3600} h", file=sys.stderr, flush=True)

    return e2e_lock(LOCK, LOCK_WAIT_S, on_wait=say_waiting)


def run_main_ppo(recipe: str, assets: Path, workdir: Path, *overrides: str, deadline_s: int = RUN_DEADLINE_S) -> Run:
    workdir.mkdir(parents=True, exist_ok=True)
    log_path = workdir / "main_ppo.log"
    env = {**os.environ, "DYJR_ASSETS_DIR": str(assets), "RAY_DEDUP_LOGS": "0", "HYDRA_FULL_ERROR": "1",
           **file_logger_env(workdir)}
    cmd = [
        sys.executable, "-m", "verl.trainer.main_ppo",
        "--config-path", str(RECIPES), "--config-name", recipe,
        f"trainer.default_local_dir={workdir / 'checkpoints'}",
        *overrides,
    ]
    with machine_lock(), log_path.open("w") as log:
        try:
            proc = subprocess.run(cmd, cwd=workdir, env=env, stdout=log, stderr=subprocess.STDOUT, timeout=deadline_s)
            rc = proc.returncode
        except subprocess.TimeoutExpired:
            rc = -9
        # Ray leaves its local cluster behind when the driver is killed; stop it so runs don't pile
        # up. Under the lock: no other trainer's cluster is running now.
        ray_stop()
    metrics = Path(env[FILE_LOGGER_ENV])  # <workdir>/metrics.jsonl, resolved
    # a run that failed before its first step has no metrics file: its steps are empty, and the
    # tests' step assertions show the console tail
    steps = read_steps(metrics) if metrics.is_file() else {}
    return Run(rc, log_path.read_text(errors="replace"), log_path, metrics, steps)
