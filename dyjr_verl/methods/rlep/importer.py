"""RLEP: import the released experience pool into the pool format ``rlep.pool_path`` loads.

    python -m dyjr_verl.methods.rlep.importer --input dapo-math-17k-with-experience-pool.parquet --out pool.parquet \\
        [--min-correct 2] [--dedup] [--rescore] [--train-out train.parquet] [--check-train train.parquet]

The release (``Kwai-Klear/RLEP_dataset``) is DAPO-Math-17k in verl's schema with the pool inside it:
``reward_model.candidates``, a list of verified-correct response strings per prompt, beside
``reward_model.ground_truth``. Each row is converted exactly as ``python -m dyjr_verl.data.math``
converts it (same ``--data-source`` / ``--instruction`` options, same defaults: the user message
verbatim, the row's own ``data_source``), and keyed with :func:`dyjr_verl.replay.questions.question_key`
of that prompt, so the pool matches a training file made from the same rows by ``data.math`` (or by
``--train-out``, which writes it from this very file). ``--check-train`` counts the questions of a
training file found in the pool and refuses a pool that matches none of them (RLEP would replay
nothing).

Repeated prompts are one question: their candidate lists are merged, a list identical to one already
taken for that question counted once. Empty candidates are dropped. Every candidate is kept,
duplicates included (as ``rlep_collect`` keeps every correct sample; ``--dedup`` stores distinct
strings), then questions with fewer than ``--min-correct`` answers are dropped.

Re-verification: by default the release's verdict is trusted (its answers were checked by DAPO's
``math_dapo`` verifier, and ``rlep_math`` re-scores every replayed answer with our reward at training
time, ``rlep.rescore=true``). ``--rescore`` checks every candidate against ``ground_truth`` with the
task reward (``--reward``, default ``pkg://dyjr_verl.rewards.math``) now and keeps only those it
scores above ``--correct-threshold``, so the pool holds what our verifier accepts (then
``rlep.rescore=false`` is safe).
"""

from __future__ import annotations

import argparse
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Iterator

__all__ = ["main", "import_pool", "build_parser"]

_PROG = "rlep_import"


def _records(path: Path, batch_rows: int = 1024) -> Iterator[dict[str, Any]]:
    """Rows of the release, streamed in record batches (the real file holds ~1M answer strings)."""
    if path.suffix.lower() != ".parquet":
        from dyjr_verl.data.schema import read_records

        yield from read_records(path)
        return
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except Exception as exc:  # pyarrow raises several types for corrupt files
        raise ValueError(f"{path}: cannot read parquet ({exc})") from None
    for batch in pf.iter_batches(batch_size=batch_rows):
        yield from batch.to_pylist()


def _num_rows(path: Path) -> int | None:
    if path.suffix.lower() != ".parquet":
        return None
    import pyarrow.parquet as pq

    return pq.ParquetFile(path).metadata.num_rows


def _candidates(rec: dict[str, Any], key: str, where: str) -> list[str]:
    from dyjr_verl.data.schema import get_path
    from dyjr_verl.replay.questions import plain as _plain

    raw = _plain(get_path(rec, key))
    if raw is None:
        raise ValueError(f"{where}: no {key!r} field (is this the released pool? found {', '.join(sorted(rec))})")
    if not isinstance(raw, list) or not all(isinstance(c, str) for c in raw):
        raise ValueError(f"{where}: {key!r} must be a list of response strings, got {type(raw).__name__}")
    return raw


def _rescore(questions: dict[str, dict[str, Any]], args: argparse.Namespace) -> tuple[int, int]:
    """Keep only the candidates the reward scores above the threshold; returns (checked, correct)."""
    from tqdm import tqdm

    from dyjr_verl.methods.rlep.collect import _score_value, load_reward_fn

    try:
        reward_fn = load_reward_fn(args.reward, args.reward_name)
    except (ImportError, FileNotFoundError, AttributeError) as exc:
        raise ValueError(f"cannot load --reward {args.reward} ({args.reward_name}): {exc}") from None
    checked = correct = 0
    with ThreadPoolExecutor(max_workers=args.reward_workers) as pool:
        for q in tqdm(questions.values(), desc="rescore", unit="question", file=sys.stderr, delay=1):
            futures = [pool.submit(reward_fn, data_source=q["data_source"], solution_str=c,
                                   ground_truth=q["ground_truth"], extra_info={}) for c in q["candidates"]]
            keep = [c for c, f in zip(q["candidates"], futures) if _score_value(f.result()) > args.correct_threshold]
            checked += len(q["candidates"])
            correct += len(keep)
            q["candidates"] = keep
    return checked, correct


def import_pool(args: argparse.Namespace) -> dict[str, Any]:
    from tqdm import tqdm

    from dyjr_verl.data.math import convert_record, default_data_source
    from dyjr_verl.data.schema import make_row, write_parquet
    from dyjr_verl.methods.rlep.pool import RLEPPool
    from dyjr_verl.replay.questions import question_key

    src = Path(args.input)
    questions: dict[str, dict[str, Any]] = {}  # question key -> converted question + candidates
    rows_read = duplicates = empty = 0
    default_source = default_data_source(str(src))
    for i, rec in enumerate(tqdm(_records(src), total=_num_rows(src), desc="read", unit="row", file=sys.stderr,
                                   delay=1)):
        rows_read += 1
        where = f"row {i}"
        m = convert_record(rec, where, data_source=args.data_source, default_source=default_source,
                           problem_key=args.problem_key, instruction=args.instruction)
        cands = _candidates(rec, args.candidates_key, where)
        kept = [c for c in cands if c.strip()]
        empty += len(cands) - len(kept)
        key = question_key([{"role": "user", "content": m.prompt}], m.data_source)
        q = questions.get(key)
        if q is None:
            questions[key] = {"record": m, "data_source": m.data_source, "ground_truth": m.answer, "index": len(questions),
                              "source_index": i, "candidates": kept, "lists": {tuple(cands)}}
            continue
        duplicates += 1
        if tuple(cands) not in q["lists"]:  # the same question with other answers: merge them
            q["lists"].add(tuple(cands))
            q["candidates"].extend(kept)
    if not questions:
        raise ValueError(f"{src}: no rows")
    summary: dict[str, Any] = {"rows": rows_read, "questions": len(questions), "duplicate_rows": duplicates,
                               "empty_candidates": empty}
    if args.rescore:
        summary["rescored"], summary["rescored_correct"] = _rescore(questions, args)
    if args.dedup:
        for q in questions.values():
            q["candidates"] = list(dict.fromkeys(q["candidates"]))
    meta = {"source": "rlep_import", "input": str(src), "rescored": bool(args.rescore),
            "reward": args.reward if args.rescore else None, "dedup": bool(args.dedup),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S")}
    pool = RLEPPool({k: q["candidates"] for k, q in questions.items()}, min_correct=args.min_correct, meta=meta)
    rows = [{"question_key": k, "data_source": q["data_source"], "index": q["index"], "num_samples": None,
             "num_correct": len(q["candidates"])} for k, q in questions.items()]
    out = pool.save(args.out, rows=rows)
    summary.update({"out": str(out), "pool_questions": len(pool), "stored_answers": pool.num_candidates,
                    "below_min_correct": pool.dropped})
    if args.train_out:
        train = [make_row(data_source=q["data_source"], prompt=q["record"].prompt, ability="math",
                          ground_truth=q["ground_truth"], split="train", index=q["index"],
                          extra={"id": str(q["source_index"]), "question": q["record"].problem,
                                 "answer": q["ground_truth"], "source_index": q["source_index"]})
                 for q in questions.values()]
        summary["train_out"] = str(write_parquet(train, args.train_out))
    if args.check_train:
        summary["train_questions"], summary["train_in_pool"] = _coverage(args.check_train, pool)
    return summary


def _coverage(train_path: str, pool: Any) -> tuple[int, int]:
    """(questions, questions in the pool) of a training parquet, keyed as the trainer keys them."""
    import pandas as pd

    from dyjr_verl.replay.questions import question_key

    df = pd.read_parquet(train_path, columns=["prompt", "data_source"])
    keys = {question_key(p, s) for p, s in zip(df["prompt"], df["data_source"])}
    found = sum(k in pool for k in keys)
    if not found:
        raise ValueError(f"none of the {len(keys)} questions of {train_path} is in the pool: prompts or data_source "
                         "differ (convert both with the same --data-source/--instruction, or use --train-out)")
    return len(keys), found


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m dyjr_verl.methods.rlep.importer", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", required=True, help="released pool: DAPO-style parquet (or .jsonl) with reward_model.candidates")
    p.add_argument("--out", required=True, help="pool parquet to write (rlep.pool_path)")
    p.add_argument("--min-correct", type=int, default=2, help="questions need this many answers (RLEP: 2)")
    p.add_argument("--dedup", action="store_true", help="store identical answers of a question once")
    p.add_argument("--rescore", action="store_true", help="re-verify every candidate with --reward, keep the correct ones")
    p.add_argument("--reward", default="pkg://dyjr_verl.rewards.math", help="reward module for --rescore")
    p.add_argument("--reward-name", default="compute_score")
    p.add_argument("--reward-workers", type=int, default=8, help="threads calling the reward function")
    p.add_argument("--correct-threshold", type=float, default=0.5, help="score above which a candidate is correct")
    p.add_argument("--candidates-key", default="reward_model.candidates", help="dotted field holding the answer list")
    p.add_argument("--problem-key", help="prompt field (default: as python -m dyjr_verl.data.math)")
    p.add_argument("--data-source", help="data_source for every question (default: each row's own); must match "
                                         "the training file's")
    p.add_argument("--instruction", default=None, help="as python -m dyjr_verl.data.math --instruction (must match "
                                                       "the training file's)")
    p.add_argument("--train-out", help="also write the de-duplicated training parquet (verl schema) whose prompts the "
                                       "pool keys match")
    p.add_argument("--check-train", help="training parquet: report how many of its questions are in the pool "
                                         "(error when none)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.min_correct < 1 or args.reward_workers < 1:
            raise ValueError("--min-correct and --reward-workers must be >= 1")
        if not Path(args.input).is_file():
            raise ValueError(f"--input does not exist: {args.input}")
        if args.check_train and not Path(args.check_train).is_file():
            raise ValueError(f"--check-train does not exist: {args.check_train}")
        if Path(args.out).suffix != ".parquet":
            raise ValueError(f"--out must end in .parquet, got {args.out}")
        s = import_pool(args)
    except ValueError as exc:
        print(f"{_PROG}: error: {exc}", file=sys.stderr)
        return 2
    print(f"{_PROG}: {s['rows']} rows, {s['questions']} distinct questions "
          f"({s['duplicate_rows']} duplicate rows merged); {s['empty_candidates']} empty candidates dropped")
    if args.rescore:
        print(f"{_PROG}: rescored with {args.reward}: {s['rescored_correct']} of {s['rescored']} candidates correct")
    print(f"{_PROG}: wrote {s['pool_questions']} questions, {s['stored_answers']} answers to {s['out']} "
          f"({s['below_min_correct']} questions below --min-correct {args.min_correct} dropped)")
    if "train_out" in s:
        print(f"{_PROG}: wrote {s['questions']} training rows to {s['train_out']}")
    if "train_questions" in s:
        print(f"{_PROG}: {s['train_in_pool']} of {s['train_questions']} questions of {args.check_train} are in the pool")
    return 0


if __name__ == "__main__":
    sys.exit(main())
