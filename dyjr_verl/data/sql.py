"""Text-to-SQL datasets (Spider, BIRD, plain files) -> verl parquet with schema-in-prompt.

Usage::

    python -m dyjr_verl.data.sql INPUT (or --input INPUT) --output OUT.parquet [--split dev] [--limit N] [--seed S]
        [--db-root DIR] [--build-db-dir DIR] [--relative-to DIR] [--sample-rows K] [--data-source NAME]
        [--hf-config C]

``INPUT`` is one of

* a Spider directory: ``<split>.json`` or ``<split>.jsonl`` (``train`` without a ``train.json`` reads
  Spider's two training files, ``train_spider.json`` and ``train_others.json``), ``tables.json`` and
  ``database/<db_id>/<db_id>.sqlite``; the test split looks in ``test_database/`` first (newer releases).
  Databases shipped only as ``database/<db_id>/schema.sql`` (like ``shared/data/spider``) are built into
  ``--build-db-dir``;
* a BIRD directory: ``<split>.json`` with ``question``, ``evidence``, ``SQL``, ``db_id`` and
  ``<split>_databases/<db_id>/<db_id>.sqlite``;
* a ``.jsonl``/``.json``/``.parquet`` file with ``question``, ``query`` or ``SQL``, ``db_id`` (and
  optionally ``evidence``); databases are looked up under ``--db-root`` (``<root>/<db_id>/<db_id>.sqlite``);
* a hub dataset name (``owner/name``, needs network access) with the same fields plus ``--db-root``.

Each row's prompt comes from :func:`dyjr_verl.rewards.sql.build_sql_prompt` (CREATE TABLEs read from the
SQLite file, optional sample rows, BIRD evidence); ``reward_model.ground_truth`` is the gold SQL and
``extra_info`` carries ``db_id`` and the absolute ``db_path`` that :mod:`dyjr_verl.rewards.sql` executes
against. With ``--relative-to DIR`` the ``db_path`` is stored relative to ``DIR``, and training passes
where ``DIR`` is mounted on its machines as the reward's ``db_root``
(``reward.custom_reward_function.reward_kwargs.db_root=...``). ``data_source`` is ``spider``/``bird`` for
those layouts, else the file stem.
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

__all__ = ["detect_layout", "find_split_files", "spider_database_dirs", "DatabaseLocator", "convert", "main"]

QUESTION_KEYS = ("question", "nl", "utterance")
SQL_KEYS = ("query", "SQL", "sql", "gold_sql")


def detect_layout(path: Path, split: str) -> str:
    """``spider`` | ``bird`` | ``file`` for a local input path."""
    if path.is_dir():
        if (path / f"{split}_databases").is_dir() or (path / "dev_databases").is_dir() or (path / "train_databases").is_dir():
            return "bird"
        if spider_database_dirs(path, split):
            return "spider"
        raise ValueError(
            f"{path}: not a Spider (database/, test_database/) or BIRD (<split>_databases/) directory"
        )
    return "file"


def spider_database_dirs(directory: Path, split: str) -> list[Path]:
    """Spider's database directories, the split's own first: newer releases add ``test_database/``
    (every database of the test split, which ``database/`` lacks)."""
    names = ["test_database", "database"] if split == "test" else ["database", "test_database"]
    return [directory / n for n in names if (directory / n).is_dir()]


def _first_file(directory: Path, names: Sequence[str]) -> Path | None:
    return next((directory / n for n in names if (directory / n).is_file()), None)


def find_split_files(directory: Path, split: str, layout: str) -> list[Path]:
    """The question file(s) of ``split`` inside a Spider/BIRD directory.

    Spider has no ``train.json``: its training split is ``train_spider.json`` plus ``train_others.json``
    (questions over databases from earlier datasets), read in that order.
    """
    names = [f"{split}.jsonl", f"{split}.json"]
    own = _first_file(directory, names)
    if own is not None:
        return [own]
    if layout == "spider" and split == "train":
        parts = [_first_file(directory, [f"train_{part}.json", f"train_{part}.jsonl"]) for part in ("spider", "others")]
        if parts[0] is not None:
            return [f for f in parts if f is not None]
        names += ["train_spider.json", "train_spider.jsonl"]
    raise ValueError(f"{directory}: no question file for split {split!r} (looked for {', '.join(names)})")


class DatabaseLocator:
    """Maps ``db_id`` to an existing SQLite file, building Spider ``schema.sql`` databases on demand."""

    def __init__(self, roots: Sequence[Path], build_dir: Path | None) -> None:
        self.roots = [Path(r) for r in roots]
        self.build_dir = Path(build_dir).resolve() if build_dir else None
        self._cache: dict[str, Path] = {}

    def path(self, db_id: str) -> Path:
        if db_id not in self._cache:
            self._cache[db_id] = self._find(db_id)
        return self._cache[db_id]

    def _find(self, db_id: str) -> Path:
        if not db_id or not re.fullmatch(r"[\w.-]+", db_id) or db_id in (".", ".."):
            raise ValueError(f"invalid db_id {db_id!r}")
        for root in self.roots:
            cand = root / db_id / f"{db_id}.sqlite"
            if cand.is_file():
                return cand.resolve()
        for root in self.roots:
            schema = root / db_id / "schema.sql"
            if schema.is_file():
                if self.build_dir is None:
                    raise ValueError(
                        f"database {db_id!r} exists only as {schema}; pass --build-db-dir DIR to build its SQLite file"
                    )
                from dyjr_verl.rewards.sql import build_spider_sqlite

                out = self.build_dir / db_id / f"{db_id}.sqlite"
                if not out.is_file():
                    build_spider_sqlite(schema, out)
                return out
        where = ", ".join(str(r) for r in self.roots) or "(no --db-root given)"
        raise ValueError(f"database {db_id!r} not found under {where}")


def convert(
    records: Sequence[dict[str, Any]],
    *,
    data_source: str,
    split: str,
    locator: DatabaseLocator,
    limit: int | None = None,
    seed: int | None = None,
    sample_rows: int = 0,
    relative_to: Path | None = None,
) -> list[dict[str, Any]]:
    """verl rows (``extra_info``: split, index, id, db_id, db_path, question, evidence, answer, source_index).

    ``db_path`` is absolute, or relative to ``relative_to`` when given (every database must lie under it).
    """
    from dyjr_verl.rewards.sql import build_sql_prompt

    root = Path(relative_to).resolve() if relative_to is not None else None
    rows = []
    for out_idx, (src_idx, rec) in enumerate(select_records(records, limit, seed)):
        where = f"record {src_idx}"
        question = str(first_key(rec, QUESTION_KEYS, "question", where)).strip()
        gold = str(first_key(rec, SQL_KEYS, "gold SQL", where)).strip()
        db_id = str(first_key(rec, ("db_id",), "db_id", where))
        evidence = str(rec.get("evidence") or "").strip()
        db_path = locator.path(db_id)
        stored = db_path
        if root is not None:
            try:
                stored = db_path.resolve().relative_to(root)
            except ValueError:
                raise ValueError(f"database {db_path} is not under --relative-to {root}") from None
        rows.append(
            make_row(
                data_source=data_source,
                prompt=build_sql_prompt(db_path, question, sample_rows, evidence=evidence or None),
                ability="sql",
                ground_truth=gold,
                split=split,
                index=out_idx,
                extra={
                    "id": str(rec.get("id", rec.get("question_id", src_idx))),
                    "db_id": db_id,
                    "db_path": str(stored),
                    "question": question,
                    "evidence": evidence,
                    "answer": gold,
                    "source_index": int(src_idx),
                },
            )
        )
    return rows


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m dyjr_verl.data.sql", description=__doc__.split("\n\n")[0])
    add_input_argument(ap, "Spider/BIRD directory, a .jsonl/.json/.parquet file, or a hub dataset name")
    ap.add_argument("--output", "-o", required=True, help="output .parquet path")
    ap.add_argument("--split", default="dev", help="which question file to read; also stored in extra_info")
    ap.add_argument("--limit", type=int, help="keep at most this many rows (after shuffling, if --seed)")
    ap.add_argument("--seed", type=int, help="shuffle the rows with this seed before --limit")
    ap.add_argument("--db-root", action="append", default=[], help="database root(s): <root>/<db_id>/<db_id>.sqlite")
    ap.add_argument("--build-db-dir", help="where to build SQLite files for databases shipped as schema.sql")
    ap.add_argument("--relative-to", metavar="DIR",
                    help="store db_path relative to DIR; at training time give DIR's mount point as the reward's "
                         "db_root (reward.custom_reward_function.reward_kwargs.db_root=...)")
    ap.add_argument("--sample-rows", type=int, default=0, help="example rows per table in the prompt")
    ap.add_argument("--data-source", help="data_source column (default: spider / bird / the file stem)")
    ap.add_argument("--hf-config", help="hub dataset configuration name")
    return ap


def _main(argv: list[str] | None) -> int:
    args = _parser().parse_args(argv)
    args.input = resolve_input(args)
    if args.sample_rows < 0:
        raise ValueError(f"--sample-rows must be >= 0, got {args.sample_rows}")
    roots = [Path(r) for r in args.db_root]
    for r in roots:
        if not r.is_dir():
            raise ValueError(f"--db-root {r} is not a directory")
    if args.relative_to is not None and not Path(args.relative_to).is_dir():
        raise ValueError(f"--relative-to {args.relative_to} is not a directory")
    src = Path(args.input)
    if src.exists():
        layout = detect_layout(src, args.split)
        if layout == "file":
            records = read_records(src)
            default_source = re.sub(r"[^a-z0-9]+", "_", src.stem.lower()).strip("_") or "sql"
        else:
            records = [r for f in find_split_files(src, args.split, layout) for r in read_records(f)]
            if layout == "spider":
                roots = [*spider_database_dirs(src, args.split), *roots]
            else:
                db_dir = src / f"{args.split}_databases"
                if not db_dir.is_dir():
                    raise ValueError(f"{src}: BIRD split {args.split!r} has no {db_dir.name}/ directory")
                roots = [db_dir, *roots]
            default_source = layout
    elif looks_like_hub_name(args.input):
        records = load_hub_dataset(args.input, args.split, args.hf_config)
        default_source = re.sub(r"[^a-z0-9]+", "_", args.input.split("/")[-1].lower()).strip("_")
    else:
        raise ValueError(f"input not found: {args.input} (not a file or directory, nor an owner/name hub dataset)")
    if not records:
        raise ValueError(f"{args.input}: no records")
    locator = DatabaseLocator(roots, Path(args.build_db_dir) if args.build_db_dir else None)
    rows = convert(
        records,
        data_source=args.data_source or default_source,
        split=args.split,
        locator=locator,
        limit=args.limit,
        seed=args.seed,
        sample_rows=args.sample_rows,
        relative_to=Path(args.relative_to) if args.relative_to is not None else None,
    )
    out = write_parquet(rows, args.output)
    print(f"wrote {len(rows)} rows to {out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """CLI entry point; returns the exit status (2 with ``error: ...`` on stderr for bad input)."""
    return run_cli(_main, argv)


if __name__ == "__main__":
    raise SystemExit(main())
