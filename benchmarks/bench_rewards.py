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
import re
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
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "nproc": str(os.cpu_count()),
        "cpu": cpu,
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
    answers = [json.loads(l)["answer"] for l in (SHARED / "math" / "math500.jsonl").read_text().splitlines() if l.strip()]
    rng = random.Random(0)
    outputs, golds, correct = [], [], []
    for i, gold in enumerate(answers):
        for right in (True, False):
            if right:
                shown = gold
            else:
                j = (i + 1) % len(answers)
                while answers[j] == gold or re.fullmatch(r"[a-z]\s*=\s*" + re.escape(gold), answers[j]):
                    j = (j + 1) % len(answers)
                shown = answers[j]
            text = FILLER * rng.randint(3, 8) + f"Therefore, the final answer is $\\boxed{{{shown}}}$."
            outputs.append(text)
            golds.append(gold)
            correct.append(right)
    return outputs, golds, correct


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def bench_math(workers: int) -> dict[str, Any]:
    from dyjr_verl.rewards import math as mr
    from verl.utils.reward_score import math_verify as verl_mv

    outputs, golds, correct = math_inputs()
    n = len(outputs)
    res: dict[str, Any] = {"n": n}

    def fresh_pool() -> None:
        """Restart the workers so no run benefits from parse caches filled by the previous one."""
        mr.configure_pool(max_workers=workers)
        mr.get_pool().warm()

    mr.configure_pool(max_workers=workers)
    res["ours_cold_start_s"], _ = timed(lambda: mr.compute_score("x", "\\boxed{\\frac12}", "0.5"))

    def ours_seq(**kw: Any) -> list[dict]:
        return [mr.compute_score("math500", o, g, **kw) for o, g in zip(outputs, golds)]

    fresh_pool()
    t, ours = timed(ours_seq)
    res["ours_seq"] = n / t
    fresh_pool()
    t, ours_batch = timed(lambda: mr.compute_score_batch(None, outputs, golds))
    res["ours_batch"] = n / t
    fresh_pool()
    with ThreadPoolExecutor(8) as ex:
        t, _ = timed(lambda: list(ex.map(lambda a: mr.compute_score("math500", *a), zip(outputs, golds))))
    res["ours_threads8"] = n / t
    fresh_pool()
    t, ours_slow = timed(lambda: mr.compute_score_batch(None, outputs, golds, fast_path=False))
    res["ours_batch_no_fast_path"] = n / t
    fresh_pool()
    t, _ = timed(lambda: ours_seq(fast_path=False))
    res["ours_seq_no_fast_path"] = n / t
    res["ours_fast_path_share"] = sum(
        1 for o, g in zip(outputs, golds) if mr._prepare(o, g, mr._options({}))[0] is not None
    ) / n

    # verl 0.9.1 built-in: spawn ProcessPoolExecutor(4), one future per call, full-output parsing.
    res["verl_cold_start_s"], _ = timed(lambda: verl_mv.compute_score("\\boxed{1}", "1"))
    t, verl_scores = timed(lambda: [verl_mv.compute_score(o, g) for o, g in zip(outputs, golds)])
    res["verl_seq"] = n / t
    with ThreadPoolExecutor(8) as ex:
        t, _ = timed(lambda: list(ex.map(lambda a: verl_mv.compute_score(*a), zip(outputs, golds))))
    res["verl_threads8"] = n / t

    ours_scores = [o["score"] for o in ours]
    res["ours_acc_vs_truth"] = sum((s == 1.0) == c for s, c in zip(ours_scores, correct)) / n
    res["ours_no_fast_acc_vs_truth"] = sum((o["score"] == 1.0) == c for o, c in zip(ours_slow, correct)) / n
    res["verl_acc_vs_truth"] = sum((s == 1.0) == c for s, c in zip(verl_scores, correct)) / n
    res["disagreements"] = [
        (golds[i], outputs[i].rsplit("boxed{", 1)[1][:-3], ours_scores[i], verl_scores[i])
        for i in range(n)
        if ours_scores[i] != verl_scores[i]
    ][:10]
    res["n_disagree"] = sum(1 for a, b in zip(ours_scores, verl_scores) if a != b)
    assert [o["score"] for o in ours_batch] == ours_scores
    return res


def bench_sql(workers: int) -> dict[str, Any]:
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
    for i, r in enumerate(rows):
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

    sr.clear_gold_cache()
    t, _ = timed(lambda: sr.compute_score_batch(None, responses, golds, infos, **kw))
    res["batch_cold_cache"] = n / t
    t, out = timed(lambda: sr.compute_score_batch(None, responses, golds, infos, **kw))
    res["batch_cached"] = n / t
    t, _ = timed(lambda: [sr.compute_score(None, *a, **kw) for a in zip(responses, golds, infos)])
    res["seq_cached"] = n / t
    t, _ = timed(lambda: sr.compute_score_batch(None, responses, golds, infos, gold_cache=False, **kw))
    res["batch_no_cache"] = n / t
    t, _ = timed(lambda: [sr.compute_score(None, *a, gold_cache=False, **kw) for a in zip(responses, golds, infos)])
    res["seq_no_cache"] = n / t
    statuses = [o["status"] for o in out]
    res["statuses"] = {s: statuses.count(s) for s in sorted(set(statuses))}
    return res


def render(info: dict[str, str], m: dict[str, Any], s: dict[str, Any], load: tuple[str, str], workers: int) -> str:
    lines = [
        "# Reward throughput",
        "",
        "Generated by `benchmarks/bench_rewards.py` (last run below). Rates are samples scored per second, after",
        "pool start-up; the machine is shared, so the load average is recorded before and after.",
        "",
        "## Machine",
        "",
        "| | |",
        "|---|---|",
    ]
    lines += [f"| {k} | {v} |" for k, v in info.items()]
    lines += [f"| load average (start / end) | {load[0]} / {load[1]} |", f"| reward pool workers | {workers} |", ""]
    lines += [
        "## Math (MATH-500-like outputs)",
        "",
        f"{m['n']} outputs: ~0.5–1.3 KB of reasoning text ending in `\\boxed{{...}}`; half the problem's own gold answer,",
        "half another problem's different answer. verl's scorer is `verl.utils.reward_score.math_verify.compute_score`",
        "(0.9.1: Math-Verify on the whole output in a 4-process spawn pool, 30 s timeout).",
        "",
        "| scorer | mode | samples/s |",
        "|---|---|---|",
        f"| ours (`dyjr_verl.rewards.math`) | sequential calls | {m['ours_seq']:.0f} |",
        f"| ours | `compute_score_batch` | {m['ours_batch']:.0f} |",
        f"| ours | 8 threads | {m['ours_threads8']:.0f} |",
        f"| ours, `fast_path=False` (every sample through Math-Verify) | sequential calls | {m['ours_seq_no_fast_path']:.0f} |",
        f"| ours, `fast_path=False` | `compute_score_batch` | {m['ours_batch_no_fast_path']:.0f} |",
        f"| verl built-in `math_verify` | sequential calls | {m['verl_seq']:.0f} |",
        f"| verl built-in `math_verify` | 8 threads | {m['verl_threads8']:.0f} |",
        "",
        f"- Ratio, sequential: ours / verl = **{m['ours_seq'] / m['verl_seq']:.1f}x**; "
        f"every sample through Math-Verify: {m['ours_seq_no_fast_path'] / m['verl_seq']:.1f}x; "
        f"batch vs verl 8 threads: {m['ours_batch'] / m['verl_threads8']:.1f}x.",
        f"- {100 * m['ours_fast_path_share']:.0f}% of these samples are decided in-process (equal normalised strings or",
        "  plain numbers); the rest go to the Math-Verify pool. Real rollouts have fewer verbatim-correct answers, so",
        "  the `fast_path=False` rows are the conservative figure.",
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
        "| gold results | mode | executions/s (samples/s) |",
        "|---|---|---|",
        f"| cached | `compute_score_batch` | {s['batch_cached']:.0f} |",
        f"| cached | sequential calls | {s['seq_cached']:.0f} |",
        f"| cache empty at start (first pass) | `compute_score_batch` | {s['batch_cold_cache']:.0f} |",
        f"| not cached (`gold_cache=False`) | `compute_score_batch` | {s['batch_no_cache']:.0f} |",
        f"| not cached | sequential calls | {s['seq_no_cache']:.0f} |",
        "",
        f"- Ratio cached / uncached: batch {s['batch_cached'] / s['batch_no_cache']:.1f}x, "
        f"sequential {s['seq_cached'] / s['seq_no_cache']:.1f}x.",
        f"- Statuses: {s['statuses']}. Building the 10 databases from schema.sql: {s['build_s']:.2f} s;"
        f" first call (pool start): {s['cold_start_s']:.2f} s.",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "rewards.md"))
    ap.add_argument("--workers", type=int, default=2, help="reward pool processes (default 2)")
    args = ap.parse_args(argv)
    info = machine_info()
    load0 = loadavg()
    m = bench_math(args.workers)
    print(json.dumps({k: v for k, v in m.items() if k != "disagreements"}, indent=1))
    s = bench_sql(args.workers)
    print(json.dumps(s, indent=1))
    text = render(info, m, s, (load0, loadavg()), args.workers)
    Path(args.out).write_text(text)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
