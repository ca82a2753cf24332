"""Math benchmark/training files -> verl parquet.

Usage::

    python -m dyjr_verl.data.math INPUT (or --input INPUT) --output OUT.parquet [--data-source NAME] [--split test]
        [--limit N] [--seed S] [--problem-key K] [--answer-key K] [--hf-config C] [--instruction TEXT]

``INPUT`` is a local ``.jsonl``/``.json``/``.parquet`` file (e.g. ``shared/data/math/math500.jsonl``) or a
Hugging Face hub dataset name (``HuggingFaceH4/MATH-500``; needs network access). The prompt is the
problem followed by :data:`MATH_INSTRUCTION`, which asks for the ``\\boxed{}`` answer that
:mod:`dyjr_verl.rewards.math` extracts. The ground truth is the ``answer`` field; if a source has only a
worked ``solution`` its last ``\\boxed{}`` is used, and GSM8K-style ``... #### 42`` answers keep the part
after ``####``. ``data_source`` defaults to the file stem (``math500``, ``aime24``...).
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path
from typing import Any, Sequence

from dyjr_verl.data.schema import (
    add_input_argument,
    first_key,
    load_hub_dataset,
    looks_like_hub_name,
    make_row,
    read_records,
    resolve_input,
    run_cli,
    select_records,
    write_parquet,
)

__all__ = ["MATH_INSTRUCTION", "build_prompt", "gold_answer", "convert", "main"]

MATH_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."
PROBLEM_KEYS = ("problem", "question", "prompt", "query")
ANSWER_KEYS = ("answer", "final_answer", "gt", "ground_truth", "solution")
_GENERIC_STEMS = {"test", "train", "dev", "validation", "val", "data"}


def build_prompt(problem: str, instruction: str = MATH_INSTRUCTION) -> str:
    """Problem text, a blank line, then the step-by-step / ``\\boxed{}`` instruction."""
    problem = problem.strip()
    return f"{problem}\n\n{instruction}" if instruction else problem


def gold_answer(raw: Any, where: str) -> str:
    """Bare gold answer from an ``answer``/``solution`` field (unwraps ``\\boxed{}`` and ``#### x``)."""
    from dyjr_verl.rewards.math import extract_boxed

    if isinstance(raw, (list, tuple)):
        if not raw:
            raise ValueError(f"{where}: empty answer list")
        raw = raw[0]
    if isinstance(raw, float) and raw.is_integer():
        raw = int(raw)
    s = str(raw).strip()
    if "\\boxed" in s or "\\fbox" in s:
        boxed = extract_boxed(s)
        if boxed is None:
            raise ValueError(f"{where}: answer has an unbalanced \\boxed{{...}}")
        s = boxed
    elif "####" in s:
        s = s.rsplit("####", 1)[1].strip()
    if not s:
        raise ValueError(f"{where}: empty answer")
    return s


def default_data_source(source: str) -> str:
    """``math500`` for ``.../math500.jsonl``; the parent folder for generic stems like ``test.jsonl``."""
    if looks_like_hub_name(source):
        return re.sub(r"[^a-z0-9]+", "_", source.split("/")[-1].lower()).strip("_")
    p = Path(source)
    stem = p.stem.lower()
    if stem in _GENERIC_STEMS and p.parent.name:
        stem = p.parent.name.lower()
    return re.sub(r"[^a-z0-9]+", "_", stem).strip("_") or "math"


def convert(
    records: Sequence[dict[str, Any]],
    *,
    data_source: str,
    split: str,
    limit: int | None = None,
    seed: int | None = None,
    problem_key: str | None = None,
    answer_key: str | None = None,
    instruction: str = MATH_INSTRUCTION,
) -> list[dict[str, Any]]:
    """verl rows for math records (``extra_info``: split, index, id, question, answer, source_index)."""
    pkeys = (problem_key,) if problem_key else PROBLEM_KEYS
    akeys = (answer_key,) if answer_key else ANSWER_KEYS
    rows = []
    for out_idx, (src_idx, rec) in enumerate(select_records(records, limit, seed)):
        where = f"record {src_idx}"
        problem = str(first_key(rec, pkeys, "problem", where))
        answer = gold_answer(first_key(rec, akeys, "answer", where), where)
        rows.append(
            make_row(
                data_source=data_source,
                prompt=build_prompt(problem, instruction),
                ability="math",
                ground_truth=answer,
                split=split,
                index=out_idx,
                extra={
                    "id": str(rec.get("id", rec.get("unique_id", src_idx))),
                    "question": problem,
                    "answer": answer,
                    "source_index": int(src_idx),
                },
            )
        )
    return rows


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m dyjr_verl.data.math", description=__doc__.split("\n\n")[0])
    add_input_argument(ap, "local .jsonl/.json/.parquet file, or a hub dataset name (owner/name)")
    ap.add_argument("--output", "-o", required=True, help="output .parquet path")
    ap.add_argument("--data-source", help="data_source column (default: derived from the input name)")
    ap.add_argument("--split", default="test", help="split label stored in extra_info; hub split to load")
    ap.add_argument("--limit", type=int, help="keep at most this many rows (after shuffling, if --seed)")
    ap.add_argument("--seed", type=int, help="shuffle the rows with this seed before --limit")
    ap.add_argument("--problem-key", help=f"problem field (default: first of {', '.join(PROBLEM_KEYS)})")
    ap.add_argument("--answer-key", help=f"answer field (default: first of {', '.join(ANSWER_KEYS)})")
    ap.add_argument("--hf-config", help="hub dataset configuration name")
    ap.add_argument("--instruction", default=MATH_INSTRUCTION, help="text appended to each problem")
    return ap


def _main(argv: list[str] | None) -> int:
    args = _parser().parse_args(argv)
    args.input = resolve_input(args)
    if Path(args.input).exists():
        records = read_records(args.input)
    elif looks_like_hub_name(args.input):
        records = load_hub_dataset(args.input, args.split, args.hf_config)
    else:
        raise ValueError(f"input not found: {args.input} (not a file, nor an owner/name hub dataset)")
    if not records:
        raise ValueError(f"{args.input}: no records")
    rows = convert(
        records,
        data_source=args.data_source or default_data_source(args.input),
        split=args.split,
        limit=args.limit,
        seed=args.seed,
        problem_key=args.problem_key,
        answer_key=args.answer_key,
        instruction=args.instruction,
    )
    out = write_parquet(rows, args.output)
    print(f"wrote {len(rows)} rows to {out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """CLI entry point; returns the exit status (2 with ``error: ...`` on stderr for bad input)."""
    return run_cli(_main, argv)


if __name__ == "__main__":
    raise SystemExit(main())
