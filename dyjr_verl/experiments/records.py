"""Run directories, their states (resumability) and the per-run JSON record.

Layout of one run (``<out>/<label>/seed<s>/``)::

    run.json            the record; written last and atomically, so its presence marks a finished run
    metrics.jsonl.gz    verl's file logger: one ``{"step": N, "data": {...}}`` line per step (the source of
                        run.json's ``steps``; ``VERL_FILE_LOGGER_PATH`` points the trainer here)
    main_ppo.log.gz     verl's console log (compressed once the run is over)
    collect.log.gz      RLEP only: the pool collection's log
    eval/               results.md/csv, scores.jsonl (per-question flags), rank_k.json, eval.log.gz
    failed.json         the last failure (rc, log tail); the run is redone on the next launch

A directory without ``run.json`` is a partial run (killed, failed): it is wiped and redone.
Checkpoints, RLEP's pool and the raw generations are deleted once the evaluation has read them.
"""

from __future__ import annotations

import gzip
import json
import math
import os
import shutil
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any

from dyjr_verl.eval.metrics import pass_at_k

RUN_FILE = "run.json"
FAILED_FILE = "failed.json"

# per-step metrics kept in run.json (metrics.jsonl.gz keeps everything)
KEEP_KEYS = (
    "critic/score/mean", "critic/rewards/mean", "actor/entropy", "actor/pg_loss", "actor/grad_norm",
    "response_length/mean", "timing_s/step", "timing_s/gen", "timing_s/update_actor", "timing_s/old_log_prob",
    "training/rollout_probs_diff_mean",
)
KEEP_PREFIXES = ("rank_k/", "actor/replay/", "dyjr/buffer/size", "dyjr/replay/", "rlep/replay/rows",
                 "rlep/replay/share", "exgrpo/replay/rows", "exgrpo/replay/share", "exgrpo/active",
                 "exgrpo/pool/questions")


class RunState(str, Enum):
    TODO = "todo"  # no directory
    PARTIAL = "partial"  # a directory without run.json: killed or failed, redone from scratch
    DONE = "done"  # run.json with the current fingerprint: skipped
    STALE = "stale"  # run.json made with other settings: refused unless --redo-stale


def run_state(run_dir: Path, fingerprint: str) -> RunState:
    record = run_dir / RUN_FILE
    if record.is_file():
        try:
            done = json.loads(record.read_text())
        except json.JSONDecodeError:
            return RunState.PARTIAL
        return RunState.DONE if done.get("fingerprint") == fingerprint else RunState.STALE
    return RunState.PARTIAL if run_dir.exists() else RunState.TODO


def write_json_atomic(path: Path, data: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=False))
    os.replace(tmp, path)


def gzip_file(path: Path) -> Path | None:
    if not path.is_file():
        return None
    out = path.with_name(path.name + ".gz")
    with path.open("rb") as src, gzip.open(out, "wb", compresslevel=6) as dst:
        shutil.copyfileobj(src, dst)
    path.unlink()
    return out



def keep_metrics(steps: dict[int, dict[str, float]]) -> dict[str, dict[str, float]]:
    out = {}
    for step in sorted(steps):
        m = steps[step]
        out[str(step)] = {k: v for k, v in m.items()
                          if (k in KEEP_KEYS or k.startswith(KEEP_PREFIXES)) and math.isfinite(v)}
    return out


def steady_steps(steps: Iterable[int]) -> list[int]:
    """Steps that time the steady state: not step 1 (compilation, cache warm-up) and not the last
    (it saves the checkpoint); falls back to every step but the first, then to all."""
    s = sorted(steps)
    for candidate in (s[1:-1], s[1:], s):
        if candidate:
            return candidate
    return []


def timing(steps: dict[int, dict[str, float]], first_step_s: float | None) -> dict[str, Any]:
    step_t = {s: m["timing_s/step"] for s, m in steps.items() if "timing_s/step" in m}
    steady = steady_steps(step_t)
    out: dict[str, Any] = {
        "steady_steps": [steady[0], steady[-1]] if steady else None,
        "steady_step_s": sum(step_t[s] for s in steady) / len(steady) if steady else None,
        "first_step_s": step_t.get(1),
        "train_steps_s": sum(step_t.values()) if step_t else None,
        "startup_s": None,
    }
    if first_step_s is not None and 1 in step_t:
        # launch -> first step line, minus step 1 itself: Ray, TransferQueue, FSDP2, vLLM engine
        out["startup_s"] = max(0.0, first_step_s - step_t[1])
    return out


def eval_summary(eval_dir: Path, ks: Iterable[int], avg_ks: Iterable[int] = (8,)) -> dict[str, float]:
    """Greedy accuracy, avg@k (first k samples), unbiased pass@k and distinct correct answers per
    question from the eval CLI's per-question ``scores.jsonl``; plus ``rank_k.json`` when present."""
    rows = read_scores(eval_dir / "scores.jsonl")
    if not rows:
        raise ValueError(f"{eval_dir / 'scores.jsonl'} is empty")
    n = min(len(r["samples"]) for r in rows)
    out: dict[str, float] = {"questions": float(len(rows)), "samples": float(n)}
    greedy = [r["greedy"] for r in rows if r["greedy"] is not None]
    if greedy:
        out["greedy"] = sum(greedy) / len(greedy)
    if n:
        for k in avg_ks:
            if k <= n:
                out[f"avg@{k}"] = sum(sum(r["samples"][:k]) / k for r in rows) / len(rows)
        out[f"avg@{n}"] = sum(sum(r["samples"][:n]) / n for r in rows) / len(rows)
        for k in ks:
            if k <= n:
                out[f"pass@{k}"] = sum(pass_at_k(n, sum(r["samples"][:n]), k) for r in rows) / len(rows)
        out["distinct_correct"] = sum(r["distinct_correct"] for r in rows) / len(rows)
    out.update(answer_spread(rows))
    rank_k = eval_dir / "rank_k.json"
    if rank_k.is_file():
        for key, value in json.loads(rank_k.read_text()).items():
            out[key] = value  # rank_k/p1 .. rank_k/entropy, on the sampled responses
    return out


def read_scores(path: Path) -> list[dict[str, Any]]:
    """The eval CLI's per-question rows (``scores.jsonl``)."""
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def answer_spread(rows: list[dict[str, Any]]) -> dict[str, float]:
    """How spread the sampled final answers are (rows of ``scores.jsonl`` with ``answers``; {} without):
    ``distinct_answers``, per question, and ``top_answer_share``, the share of all samples whose answer
    is the set's single most common one. A policy collapsed onto a near-constant answer has a share near
    1 while its per-token entropy can stay high, so pass@k and the per-token panels alone can miss it."""
    answered = [r["answers"] for r in rows if r.get("answers")]
    if not answered:
        return {}
    counts = Counter(a for answers in answered for a in answers)
    return {"distinct_answers": sum(len(set(a)) for a in answered) / len(answered),
            "top_answer_share": counts.most_common(1)[0][1] / sum(counts.values())}


def load_runs(root: Path) -> list[dict[str, Any]]:
    """Every finished run record under ``root`` (``<label>/seed<s>/run.json``). Records written before
    :func:`answer_spread` existed get it from the ``eval/scores.jsonl`` beside them."""
    runs = []
    for path in sorted(root.glob(f"*/seed*/{RUN_FILE}")):
        run = json.loads(path.read_text())
        scores = path.parent / "eval" / "scores.jsonl"
        if isinstance(run.get("eval"), dict) and "top_answer_share" not in run["eval"] and scores.is_file():
            run["eval"].update(answer_spread(read_scores(scores)))
        runs.append(run)
    return runs


@dataclass
class Cleanup:
    """What is deleted once a run's record is written (large, reproducible, never committed)."""

    run_dir: Path

    def __call__(self) -> None:
        shutil.rmtree(self.run_dir / "checkpoints", ignore_errors=True)
        for p in (self.run_dir / "rlep_pool.parquet", self.run_dir / "eval" / "generations.jsonl"):
            p.unlink(missing_ok=True)
