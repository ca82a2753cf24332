"""Reward throughput: our math reward vs verl's built-in Math-Verify scorer, and the SQL reward with
and without the gold-result cache. Writes ``benchmarks/rewards.md``.

    .venv/bin/python benchmarks/bench_rewards.py [--out benchmarks/rewards.md] [--workers 2]

Inputs are built from ../shared/data: MATH-500 gold answers boxed at the end of ~1 KB of reasoning text
(half with the problem's own answer, half with another problem's different answer), and the 461 Spider
dev gold queries on the 10 Spider databases (half the gold itself, half a wrong query). Pool start-up
is measured separately and excluded from the steady-state rates. Not a test: numbers depend on load.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
import random
import statistics
import sqlite3
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
sys.path.insert(0, str(REPO))

from machine import cpu_model  # noqa: E402  (benchmarks/ is on sys.path when run as a script)

FILLER = (
    "We start by restating the problem and identifying the quantities involved. "
    "Substituting the given values and simplifying step by step, we check each case carefully. "
    "Collecting terms and verifying the arithmetic once more gives the result below.\n"
)


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def machine_info() -> dict[str, str]:
    return {
        "nproc": str(os.cpu_count()),
        "cpu": cpu_model(),
        "python": platform.python_version(),
        "torch": _version("torch"),
        "verl": _version("verl"),
        "math-verify": _version("math-verify"),
        "sqlglot": _version("sqlglot"),
        "sqlite": sqlite3.sqlite_version,
        "platform": platform.platform(),
    }


def loadavg() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "n/a"


def math_inputs() -> tuple[list[str], list[str], list[bool]]:
    """Each MATH-500 problem twice: its gold boxed, and a wrong answer boxed. Wrong answers come from the
    MATH train slice (each used once, never equal to the gold), so no answer string repeats within a run
    and no scorer gets parse-cache hits that real rollouts would not give."""
    def load(name: str) -> list[str]:
        rows = (SHARED / "math" / name).read_text().splitlines()
        return [json.loads(line)["answer"] for line in rows if line.strip()]

    answers, pool = load("math500.jsonl"), load("math_train_2k.jsonl")
    used = set(answers)
    wrong_pool = [a for a in dict.fromkeys(pool) if a not in used]
    rng = random.Random(0)
    outputs, golds, correct = [], [], []
    for i, gold in enumerate(answers):
        for right in (True, False):
            shown = gold if right else wrong_pool[i % len(wrong_pool)]
            text = FILLER * rng.randint(3, 8) + f"Therefore, the final answer is $\\boxed{{{shown}}}$."
            outputs.append(text)
            golds.append(gold)
            correct.append(right)
    return outputs, golds, correct


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def _proc_cpu_s(pid: int) -> float:
    """utime + stime of one process (all threads), from /proc; 0 if it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return 0.0


class Measure:
    """Round-robin repetitions of named runs: wall-clock rate and CPU seconds (this process plus the
    scorer's worker processes). The CPU figure is what a loaded, shared machine cannot distort."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.wall: dict[str, list[float]] = {}
        self.cpu: dict[str, list[float]] = {}

    def run(self, name: str, fn: Callable[[], Any], worker_pids: Callable[[], list[int]]) -> Any:
        pids = worker_pids()
        cpu0 = time.process_time() + sum(_proc_cpu_s(p) for p in pids)
        t, out = timed(fn)
        cpu1 = time.process_time() + sum(_proc_cpu_s(p) for p in pids)
        self.wall.setdefault(name, []).append(self.n / t)
        self.cpu.setdefault(name, []).append(cpu1 - cpu0)
        return out

    def rate(self, name: str) -> float:
        return statistics.median(self.wall[name])

    def spread(self, name: str) -> str:
        return f"{min(self.wall[name]):.0f}–{max(self.wall[name]):.0f}"

    def per_cpu_s(self, name: str) -> float:
        """Samples per CPU-second (median over rounds)."""
        return statistics.median(self.n / c for c in self.cpu[name] if c > 0)


def bench_math(workers: int, rounds: int) -> dict[str, Any]:
    from dyjr_verl.rewards import math as mr
    from verl.utils.reward_score import math_verify as verl_mv

    outputs, golds, correct = math_inputs()
    n = len(outputs)
    res: dict[str, Any] = {"n": n}
    meas = Measure(n)

    mr.configure_pool(max_workers=workers)
    res["ours_cold_start_s"], _ = timed(lambda: mr.compute_score("x", "\\boxed{\\frac12}", "0.5"))
    res["verl_cold_start_s"], _ = timed(lambda: verl_mv.compute_score("\\boxed{1}", "1"))

    def ours_pids() -> list[int]:
        # restart the workers so that no run benefits from parse caches filled by the previous one
        mr.configure_pool(max_workers=workers)
        mr.get_pool().warm()
        return [w.process.pid for w in mr.get_pool()._workers]

    def verl_pids() -> list[int]:
        # the same for verl: a fresh pool, its 4 workers started and warmed before the clock starts
        if verl_mv._pool is not None:
            verl_mv._pool.shutdown(wait=True)
            verl_mv._pool = None
        pool = verl_mv._get_pool()
        list(pool.map(verl_mv._verify_in_subprocess, ["\\boxed{\\frac{1}{2}}"] * 8, ["0.5"] * 8))
        return list(pool._processes)

    def seq(fn: Callable[..., Any], **kw: Any) -> Callable[[], list[Any]]:
        return lambda: [fn("math500", o, g, **kw) if fn is mr.compute_score else fn(o, g) for o, g in zip(outputs, golds)]

    def threads(fn: Callable[..., Any]) -> Callable[[], list[Any]]:
        def go() -> list[Any]:
            with ThreadPoolExecutor(8) as ex:
                if fn is mr.compute_score:
                    return list(ex.map(lambda a: fn("math500", *a), zip(outputs, golds)))
                return list(ex.map(lambda a: fn(*a), zip(outputs, golds)))

        return go

    runs: list[tuple[str, Callable[[], Any], Callable[[], list[int]]]] = [
        ("ours_seq", seq(mr.compute_score), ours_pids),
        ("ours_batch", lambda: mr.compute_score_batch(None, outputs, golds), ours_pids),
        ("ours_threads8", threads(mr.compute_score), ours_pids),
        ("ours_seq_no_fast_path", seq(mr.compute_score, fast_path=False), ours_pids),
        ("ours_batch_no_fast_path", lambda: mr.compute_score_batch(None, outputs, golds, fast_path=False), ours_pids),
        ("verl_seq", seq(verl_mv.compute_score), verl_pids),
        ("verl_threads8", threads(verl_mv.compute_score), verl_pids),
    ]
    outs: dict[str, Any] = {}
    for _ in range(rounds):
        for name, fn, pids in runs:
            outs[name] = meas.run(name, fn, pids)
    res["meas"] = meas
    res["ours_fast_path_share"] = sum(
        1 for o, g in zip(outputs, golds) if mr._prepare(o, g, mr._options({}))[0] is not None
    ) / n

    ours_scores = [o["score"] for o in outs["ours_seq"]]
    verl_scores = outs["verl_seq"]
    res["ours_acc_vs_truth"] = sum((s == 1.0) == c for s, c in zip(ours_scores, correct)) / n
    res["ours_no_fast_acc_vs_truth"] = sum(
        (o["score"] == 1.0) == c for o, c in zip(outs["ours_batch_no_fast_path"], correct)
    ) / n
    res["verl_acc_vs_truth"] = sum((s == 1.0) == c for s, c in zip(verl_scores, correct)) / n
    res["disagreements"] = [
        (golds[i], outputs[i].rsplit("boxed{", 1)[1][:-3], ours_scores[i], verl_scores[i])
        for i in range(n)
        if ours_scores[i] != verl_scores[i]
    ][:10]
    res["n_disagree"] = sum(1 for a, b in zip(ours_scores, verl_scores) if a != b)
    assert [o["score"] for o in outs["ours_batch"]] == ours_scores
    mr.configure_pool()
    return res


def bench_sql(workers: int, rounds: int) -> dict[str, Any]:
    from dyjr_verl.rewards import sql as sr

    rows = [json.loads(l) for l in (SHARED / "spider" / "dev.jsonl").read_text().splitlines() if l.strip()]
    tmp = Path(tempfile.mkdtemp(prefix="bench_spider_"))
    t_build, _ = timed(
        lambda: [
            sr.build_spider_sqlite(p, tmp / p.parent.name / f"{p.parent.name}.sqlite")
            for p in sorted((SHARED / "spider" / "database").glob("*/schema.sql"))
        ]
    )
    responses, golds, infos = [], [], []
    for r in rows:
        for right in (True, False):
            pred = r["query"] if right else f"SELECT * FROM ({r['query']}) LIMIT 0"
            responses.append(f"<think>Join the tables.</think>\n```sql\n{pred}\n```")
            golds.append(r["query"])
            infos.append({"db_id": r["db_id"]})
    n = len(responses)
    kw = {"db_root": str(tmp)}
    res: dict[str, Any] = {"n": n, "build_s": t_build}
    sr.configure_pool(max_workers=workers)
    res["cold_start_s"], _ = timed(lambda: sr.compute_score(None, responses[0], golds[0], infos[0], **kw))
    sr.get_pool().warm()
    meas = Measure(n)

    def pids() -> list[int]:
        return [w.process.pid for w in sr.get_pool()._workers]

    def cold_batch() -> list[dict]:
        sr.clear_gold_cache()
        return sr.compute_score_batch(None, responses, golds, infos, **kw)

    runs: list[tuple[str, Callable[[], Any]]] = [
        ("batch_cold_cache", cold_batch),
        ("batch_cached", lambda: sr.compute_score_batch(None, responses, golds, infos, **kw)),
        ("seq_cached", lambda: [sr.compute_score(None, *a, **kw) for a in zip(responses, golds, infos)]),
        ("batch_no_cache", lambda: sr.compute_score_batch(None, responses, golds, infos, gold_cache=False, **kw)),
        ("seq_no_cache", lambda: [sr.compute_score(None, *a, gold_cache=False, **kw) for a in zip(responses, golds, infos)]),
    ]
    out: Any = None
    for _ in range(rounds):
        for name, fn in runs:
            out = meas.run(name, fn, pids)
    res["meas"] = meas
    statuses = [o["status"] for o in out]
    res["statuses"] = {s: statuses.count(s) for s in sorted(set(statuses))}
    sr.configure_pool()
    return res


def render(info: dict[str, str], m: dict[str, Any], s: dict[str, Any], load: tuple[str, str], workers: int,
           rounds: int) -> str:
    mm: Measure = m["meas"]
    sm: Measure = s["meas"]

    def mrow(label: str, mode: str, key: str) -> str:
        return f"| {label} | {mode} | {mm.rate(key):.0f} ({mm.spread(key)}) | {mm.per_cpu_s(key):.0f} |"

    def srow(label: str, mode: str, key: str) -> str:
        return f"| {label} | {mode} | {sm.rate(key):.0f} ({sm.spread(key)}) | {sm.per_cpu_s(key):.0f} |"

    lines = [
        "# Reward throughput",
        "",
        "Generated by `benchmarks/bench_rewards.py` (last run below). Each configuration ran "
        f"{rounds} times, round-robin; the",
        "table gives the median wall-clock rate (min–max in brackets) and samples per CPU-second (calling process",
        "plus the scorer's worker processes, from /proc). The machine is shared with other heavy jobs (see the",
        "load average): wall-clock rates depend on the CPU share we got, and even CPU time per sample grows under",
        "contention (an unloaded run of the same Math-Verify calls needs about half the CPU time). Compare rows",
        "of one run with each other, not with other machines.",
        "",
        "## Machine",
        "",
        "| | |",
        "|---|---|",
    ]
    lines += [f"| {k} | {v} |" for k, v in info.items()]
    lines += [f"| load average (start / end) | {load[0]} / {load[1]} |", f"| reward pool workers | {workers} |", ""]
    ours_seq, verl_seq = mm.per_cpu_s("ours_seq"), mm.per_cpu_s("verl_seq")
    lines += [
        "## Math (MATH-500-like outputs)",
        "",
        f"{m['n']} outputs: ~0.5–1.3 KB of reasoning text ending in `\\boxed{{...}}`; half the problem's own gold answer,",
        "half a wrong answer (distinct answers from the MATH train slice, so no wrong answer repeats).",
        "verl's scorer is `verl.utils.reward_score.math_verify.compute_score`",
        "(0.9.1: Math-Verify on the whole output in a 4-process spawn pool, 30 s timeout, one call at a time).",
        "Both scorers get fresh, warmed worker processes before every timed run (no run profits from parse",
        "caches filled by an earlier one).",
        "",
        "| scorer | mode | samples/s, wall | samples per CPU-s |",
        "|---|---|---|---|",
        mrow("ours (`dyjr_verl.rewards.math`)", "sequential calls", "ours_seq"),
        mrow("ours", "`compute_score_batch`", "ours_batch"),
        mrow("ours", "8 threads", "ours_threads8"),
        mrow("ours, `fast_path=False` (every sample through Math-Verify)", "sequential calls", "ours_seq_no_fast_path"),
        mrow("ours, `fast_path=False`", "`compute_score_batch`", "ours_batch_no_fast_path"),
        mrow("verl built-in `math_verify`", "sequential calls", "verl_seq"),
        mrow("verl built-in `math_verify`", "8 threads", "verl_threads8"),
        "",
        f"- Ours vs verl, sequential: {mm.rate('ours_seq') / mm.rate('verl_seq'):.1f}x wall-clock, "
        f"**{ours_seq / verl_seq:.1f}x per CPU-second**; every sample through Math-Verify: "
        f"{mm.per_cpu_s('ours_seq_no_fast_path') / verl_seq:.1f}x per CPU-second.",
        f"- {100 * m['ours_fast_path_share']:.0f}% of these samples are decided in-process (equal normalised strings or",
        "  plain numbers). The rest go to the Math-Verify pool and dominate the cost (the wrong non-integer answers);",
        "  real rollouts have fewer verbatim-correct answers, so the `fast_path=False` rows are the conservative figure.",
        f"- Goal \u2265 200 samples/s on 2 cores: best wall-clock rate here {max(mm.rate(k) for k in mm.wall if k.startswith('ours')):.0f}/s"
        f" at load {load[0].split()[0]}–{load[1].split()[0]} (2 CPUs); see the per-CPU-second column for the rate per",
        "  fully available core. Batch/threaded modes use both workers, which only pays off when cores are free.",
        f"- Cold start (first call, workers booting): ours {m['ours_cold_start_s']:.2f} s, verl {m['verl_cold_start_s']:.2f} s.",
        f"- Agreement with the construction (correct iff the gold was boxed): ours {100 * m['ours_acc_vs_truth']:.1f}%,",
        f"  ours without fast path {100 * m['ours_no_fast_acc_vs_truth']:.1f}%, verl {100 * m['verl_acc_vs_truth']:.1f}%;"
        f" ours and verl disagree on {m['n_disagree']} of {m['n']}.",
    ]
    if m["disagreements"]:
        lines += ["", "First disagreements (gold, boxed answer, ours, verl):", ""]
        lines += [f"- `{g}` vs `{p}`: {a} / {b}" for g, p, a, b in m["disagreements"]]
    lines += [
        "",
        "## SQL (Spider dev, 10 databases)",
        "",
        f"{s['n']} responses: each of the 461 gold queries once as itself and once wrapped in `SELECT * FROM (...) LIMIT 0`",
        "(wrong, except for the 14 golds whose result is empty), in a ```sql fence. Every sample executes the",
        "prediction in the sandboxed pool; without the cache the gold is executed too (two executions per sample).",
        "",
        "| gold results | mode | samples/s, wall | samples per CPU-s |",
        "|---|---|---|---|",
        srow("cached", "`compute_score_batch`", "batch_cached"),
        srow("cached", "sequential calls", "seq_cached"),
        srow("cache emptied before the pass", "`compute_score_batch`", "batch_cold_cache"),
        srow("not cached (`gold_cache=False`)", "`compute_score_batch`", "batch_no_cache"),
        srow("not cached", "sequential calls", "seq_no_cache"),
        "",
        f"- Cached / uncached: batch {sm.rate('batch_cached') / sm.rate('batch_no_cache'):.1f}x, "
        f"sequential {sm.rate('seq_cached') / sm.rate('seq_no_cache'):.1f}x (wall-clock).",
        f"- Statuses: {s['statuses']}. Building the 10 databases from schema.sql: {s['build_s']:.2f} s;"
        f" first call (pool start): {s['cold_start_s']:.2f} s.",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "rewards.md"))
    ap.add_argument("--workers", type=int, default=2, help="reward pool processes (default 2)")
    ap.add_argument("--rounds", type=int, default=2, help="round-robin repetitions of every configuration")
    args = ap.parse_args(argv)
    info = machine_info()
    load0 = loadavg()
    m = bench_math(args.workers, args.rounds)
    print(json.dumps({k: v for k, v in m["meas"].wall.items()}, indent=1))
    s = bench_sql(args.workers, args.rounds)
    print(json.dumps({k: v for k, v in s["meas"].wall.items()}, indent=1))
    text = render(info, m, s, (load0, loadavg()), args.workers, args.rounds)
    Path(args.out).write_text(text)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
