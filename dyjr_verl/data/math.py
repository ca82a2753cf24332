"""Math benchmark/training files -> verl parquet.

Usage::

    python -m dyjr_verl.data.math INPUT (or --input INPUT) --output OUT.parquet [--data-source NAME] [--split test]
        [--limit N] [--seed S] [--problem-key K] [--answer-key K] [--hf-config C] [--instruction TEXT]
        [--keep-duplicates]

``INPUT`` is a local ``.jsonl``/``.json``/``.parquet`` file (e.g. ``shared/data/math/math500.jsonl``) or a
Hugging Face hub dataset name (``HuggingFaceH4/MATH-500``; needs network access). The prompt is the
problem followed by :data:`MATH_INSTRUCTION`, which asks for the ``\\boxed{}`` answer that
:mod:`dyjr_verl.rewards.math` extracts. The ground truth is the ``answer`` field; if a source has only a
worked ``solution`` its last ``\\boxed{}`` is used, and GSM8K-style ``... #### 42`` answers keep the part
after ``####``. ``data_source`` defaults to the file stem (``math500``, ``aime24``...).

verl-format inputs such as DAPO-Math-17k are recognised by their values, no option needed: a ``prompt``
that is a chat-message list (one ``user`` message) gives its text as the problem, the answer is
``reward_model.ground_truth`` (dotted keys reach into dict columns, e.g. ``--answer-key
reward_model.ground_truth``), and the row's own ``data_source`` is kept. Such a prompt already carries
its answer-format instruction (DAPO: a final ``Answer: ...`` line, which the reward also reads), so
nothing is appended unless ``--instruction`` is given. Repeated prompts (DAPO-Math-17k holds each of its
17.9k prompts 100 times) are written once, before ``--limit``; ``--keep-duplicates`` keeps them.
A field that is neither text nor a chat prompt (a dict, a list of messages used as the answer...) is an
error, never written as its Python repr.
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, NamedTuple, Sequence

from dyjr_verl.data.schema import (
    add_input_argument,
    find_key,
    load_hub_dataset,
    looks_like_hub_name,
    make_row,
    read_records,
    resolve_input,
    run_cli,
    select_records,
    write_parquet,
)

__all__ = [
    "MATH_INSTRUCTION", "Conversion", "MathRecord", "build_prompt", "gold_answer", "problem_text", "convert_record",
    "convert", "main",
]

MATH_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."
PROBLEM_KEYS = ("problem", "question", "prompt", "query")
ANSWER_KEYS = ("answer", "final_answer", "gt", "ground_truth", "solution", "reward_model.ground_truth")
_GENERIC_STEMS = {"test", "train", "dev", "validation", "val", "data"}


def _plain(x: Any) -> Any:
    from dyjr_verl.replay.questions import plain  # numpy arrays from pandas -> lists

    return plain(x)


def _describe(value: Any) -> str:
    """Short description of a rejected value for an error line."""
    if isinstance(value, Mapping):
        return f"a dict with keys {', '.join(map(str, value)) or 'none'}"
    if isinstance(value, list):
        return f"a list of {len(value)} {'dicts' if value and isinstance(value[0], Mapping) else 'items'}"
    return f"a {type(value).__name__}"


def build_prompt(problem: str, instruction: str = MATH_INSTRUCTION) -> str:
    """Problem text, a blank line, then the step-by-step / ``\\boxed{}`` instruction."""
    problem = problem.strip()
    return f"{problem}\n\n{instruction}" if instruction else problem


def problem_text(raw: Any, where: str, key: str) -> tuple[str, bool]:
    """``(text, is_chat)``: a plain string, or the user text of a one-user-message chat prompt."""
    raw = _plain(raw)
    if isinstance(raw, str):
        if re.match(r"""\s*\[\s*\{\s*['"]role['"]""", raw):  # a message list saved as its repr/JSON text
            raise ValueError(f"{where}: problem field {key!r} is the text of a chat-message list ({raw[:40]!r}...); "
                             "store the list itself, not its string form")
        return raw, False
    if isinstance(raw, list) and raw and all(isinstance(m, Mapping) and "content" in m for m in raw):
        roles = [str(m.get("role", "")) for m in raw]
        if roles != ["user"]:
            # a system prompt or earlier turns would be dropped silently: refuse instead
            raise ValueError(f"{where}: field {key!r} is a chat prompt with roles {roles}; only one user message "
                             "is supported")
        content = raw[0]["content"]
        if not isinstance(content, str):
            raise ValueError(f"{where}: field {key!r} has a user message whose content is {_describe(content)}, "
                             "not text")
        return content, True
    raise ValueError(f"{where}: problem field {key!r} is {_describe(raw)}, not text or a chat-message list "
                     "(choose another with --problem-key)")


def gold_answer(raw: Any, where: str, key: str = "answer") -> str | list[str]:
    """Bare gold answer from an ``answer``/``solution`` field (unwraps ``\\boxed{}`` and ``#### x``);
    a list of reference answers stays a list (each unwrapped; the math reward accepts any of them)."""
    raw = _plain(raw)
    if isinstance(raw, list) and len(raw) > 1 and all(isinstance(a, (str, int, float)) for a in raw):
        return [_one_gold(a, f"{where} answer {i}", key) for i, a in enumerate(raw)]
    return _one_gold(raw, where, key)


def _one_gold(raw: Any, where: str, key: str) -> str:
    from dyjr_verl.rewards.math import extract_boxed

    if isinstance(raw, Mapping):
        hint = f"; use --answer-key {key}.ground_truth" if "ground_truth" in raw else " (choose another with --answer-key)"
        raise ValueError(f"{where}: answer field {key!r} is {_describe(raw)}, not an answer{hint}")
    if isinstance(raw, list):
        if not raw:
            raise ValueError(f"{where}: empty answer list")
        if not all(isinstance(a, (str, int, float)) for a in raw):
            raise ValueError(f"{where}: answer field {key!r} is {_describe(raw)}, not an answer "
                             "(choose another with --answer-key)")
        raw = raw[0]
    if isinstance(raw, float) and raw.is_integer():
        raw = int(raw)
    if not isinstance(raw, (str, int, float)):
        raise ValueError(f"{where}: answer field {key!r} is {_describe(raw)}, not an answer")
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


class MathRecord(NamedTuple):
    """One source record, converted: what goes into the verl row."""

    problem: str
    answer: str | list[str]
    prompt: str
    data_source: str


def convert_record(
    rec: Mapping[str, Any],
    where: str,
    *,
    data_source: str | None,
    default_source: str,
    problem_key: str | None = None,
    answer_key: str | None = None,
    instruction: str | None = None,
) -> MathRecord:
    """Problem, gold answer, prompt text and data source of one record.

    ``data_source``: forced name, else the record's own ``data_source`` (verl-format inputs), else
    ``default_source``. ``instruction=None``: :data:`MATH_INSTRUCTION` after a plain problem, nothing
    after a chat prompt (it carries its own instruction).
    """
    pkey, raw_problem = find_key(dict(rec), (problem_key,) if problem_key else PROBLEM_KEYS, "problem", where)
    akey, raw_answer = find_key(dict(rec), (answer_key,) if answer_key else ANSWER_KEYS, "answer", where)
    problem, is_chat = problem_text(raw_problem, where, pkey)
    answer = gold_answer(raw_answer, where, akey)
    if instruction is None:
        instruction = "" if is_chat else MATH_INSTRUCTION
    own = rec.get("data_source")
    source = data_source or (own if isinstance(own, str) and own.strip() else default_source)
    return MathRecord(problem.strip(), answer, build_prompt(problem, instruction), source)


class Conversion(NamedTuple):
    """verl rows, and how many records were left out as repeats of an earlier prompt (``conflicts``:
    repeats whose answer differed from the kept one)."""

    rows: list[dict[str, Any]]
    duplicates: int
    conflicts: int


def convert(
    records: Sequence[dict[str, Any]],
    *,
    data_source: str | None = None,
    default_source: str = "math",
    split: str,
    limit: int | None = None,
    seed: int | None = None,
    problem_key: str | None = None,
    answer_key: str | None = None,
    instruction: str | None = None,
    dedup: bool = True,
) -> Conversion:
    """verl rows for math records (``extra_info``: split, index, id, question, answer, source_index).

    With ``dedup`` a record whose (data source, prompt) was already written is skipped; ``limit``
    counts the rows written, so it gives that many distinct prompts."""
    if limit is not None and limit < 0:
        raise ValueError(f"--limit must be >= 0, got {limit}")
    rows: list[dict[str, Any]] = []
    seen: dict[tuple[str, str], Any] = {}
    duplicates = conflicts = 0
    for src_idx, rec in select_records(records, None, seed):
        if limit is not None and len(rows) >= limit:
            break
        where = f"record {src_idx}"
        m = convert_record(rec, where, data_source=data_source, default_source=default_source,
                           problem_key=problem_key, answer_key=answer_key, instruction=instruction)
        if dedup:
            key = (m.data_source, m.prompt)
            if key in seen:
                duplicates += 1
                conflicts += seen[key] != m.answer
                continue
            seen[key] = m.answer
        rows.append(
            make_row(
                data_source=m.data_source,
                prompt=m.prompt,
                ability="math",
                ground_truth=m.answer,
                split=split,
                index=len(rows),
                extra={
                    "id": str(rec.get("id", rec.get("unique_id", src_idx))),
                    "question": m.problem,
                    "answer": m.answer,
                    "source_index": int(src_idx),
                },
            )
        )
    if any(isinstance(r["reward_model"]["ground_truth"], list) for r in rows):
        # one parquet column type: when some question has several reference answers, every row's
        # ground truth is a list (the reward takes a string or a list alike)
        for r in rows:
            for holder, key in ((r["reward_model"], "ground_truth"), (r["extra_info"], "answer")):
                if not isinstance(holder[key], list):
                    holder[key] = [holder[key]]
    return Conversion(rows, duplicates, conflicts)


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m dyjr_verl.data.math", description=__doc__.split("\n\n")[0])
    add_input_argument(ap, "local .jsonl/.json/.parquet file, or a hub dataset name (owner/name)")
    ap.add_argument("--output", "-o", required=True, help="output .parquet path")
    ap.add_argument("--data-source", help="data_source column (default: derived from the input name)")
    ap.add_argument("--split", default="test", help="split label stored in extra_info; hub split to load")
    ap.add_argument("--limit", type=int, help="keep at most this many rows (after shuffling, if --seed)")
    ap.add_argument("--seed", type=int, help="shuffle the rows with this seed before --limit")
    ap.add_argument("--problem-key", help=f"problem field: text or a chat-message list (default: first of "
                                          f"{', '.join(PROBLEM_KEYS)})")
    ap.add_argument("--answer-key", help=f"answer field, dotted for dict columns (default: first of {', '.join(ANSWER_KEYS)})")
    ap.add_argument("--hf-config", help="hub dataset configuration name")
    ap.add_argument("--instruction", default=None,
                    help="text appended to each problem (default: the \\boxed{} instruction after a plain problem, "
                         "nothing after a chat-message prompt, which carries its own)")
    ap.add_argument("--keep-duplicates", action="store_true", help="keep repeated prompts (default: write each once)")
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
    conv = convert(
        records,
        data_source=args.data_source,
        default_source=default_data_source(args.input),
        split=args.split,
        limit=args.limit,
        seed=args.seed,
        problem_key=args.problem_key,
        answer_key=args.answer_key,
        instruction=args.instruction,
        dedup=not args.keep_duplicates,
    )
    if not args.keep_duplicates:
        conflict = f" ({conv.conflicts} of them with a different answer; the first answer was kept)" if conv.conflicts else ""
        print(f"dropped {conv.duplicates} duplicate rows (same data_source and prompt as an earlier row){conflict}")
    out = write_parquet(conv.rows, args.output)
    print(f"wrote {len(conv.rows)} rows to {out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """CLI entry point; returns the exit status (2 with ``error: ...`` on stderr for bad input)."""
    return run_cli(_main, argv)


if __name__ == "__main__":
    raise SystemExit(main())
