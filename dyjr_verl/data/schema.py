"""Shared pieces of the data-prep CLIs: verl's parquet row schema, input readers, CLI error handling.

verl's ``RLHFDataset`` reads these columns (verl-extension-points.md section 9):
``data_source`` (str), ``prompt`` (chat list ``[{"role": "user", "content": ...}]``), ``ability`` (str),
``reward_model`` (``{"style": "rule", "ground_truth": str}``) and ``extra_info`` (dict with at least
``split`` and ``index``). Every row of one file gets the same ``extra_info`` keys, because pyarrow
stores the dicts as one struct column.
"""

from __future__ import annotations

import json
import random
import re
import sys
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

from dyjr_verl.jsonlines import json_lines

__all__ = [
    "VERL_COLUMNS",
    "make_row",
    "write_parquet",
    "read_records",
    "looks_like_hub_name",
    "load_hub_dataset",
    "select_records",
    "first_key",
    "find_key",
    "get_path",
    "add_input_argument",
    "resolve_input",
    "run_cli",
]

VERL_COLUMNS = ("data_source", "prompt", "ability", "reward_model", "extra_info")


def make_row(
    *,
    data_source: str,
    prompt: str,
    ability: str,
    ground_truth: str | list[str],
    split: str,
    index: int,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """One verl row; ``extra`` is merged into ``extra_info`` after ``split`` and ``index``."""
    if not prompt or not prompt.strip():
        raise ValueError(f"row {index}: empty prompt")
    golds = ground_truth if isinstance(ground_truth, list) else [ground_truth]
    if not golds or any(g is None or not str(g).strip() for g in golds):
        raise ValueError(f"row {index}: empty ground truth")
    info: dict[str, Any] = {"split": split, "index": int(index)}
    info.update(extra or {})
    return {
        "data_source": data_source,
        "prompt": [{"role": "user", "content": prompt}],
        "ability": ability,
        # several reference answers stay a list (any of them is correct), one is a string
        "reward_model": {"style": "rule", "ground_truth": [str(g) for g in golds] if isinstance(ground_truth, list)
                         else str(ground_truth)},
        "extra_info": info,
    }


def write_parquet(rows: Sequence[dict[str, Any]], output: str | Path) -> Path:
    """Write rows with pandas/pyarrow (creating the parent directory); refuses an empty dataset."""
    import pandas as pd

    if not rows:
        raise ValueError("no rows to write (empty input, or --limit 0?)")
    out = Path(output)
    if out.suffix != ".parquet":
        raise ValueError(f"--output must end in .parquet, got {out}")
    out.parent.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(list(rows), columns=list(VERL_COLUMNS)).to_parquet(out, index=False)
    return out


def read_records(path: str | Path) -> list[dict[str, Any]]:
    """Records of a local ``.jsonl``, ``.json`` (a list, or a dict with a list under ``data``/``rows``) or ``.parquet``."""
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"input file not found: {p}")
    suffix = p.suffix.lower()
    if suffix == ".jsonl":
        records = []
        with p.open(encoding="utf-8") as fh:
            for lineno, obj in json_lines(fh, str(p)):
                if not isinstance(obj, dict):
                    raise ValueError(f"{p}:{lineno}: expected a JSON object per line, got {type(obj).__name__}")
                records.append(obj)
        return records
    if suffix == ".json":
        try:
            obj = json.loads(p.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise ValueError(f"{p}: invalid JSON ({exc.msg} at line {exc.lineno})") from None
        if isinstance(obj, dict):
            for key in ("data", "rows", "examples"):
                if isinstance(obj.get(key), list):
                    obj = obj[key]
                    break
        if not isinstance(obj, list) or not all(isinstance(r, dict) for r in obj):
            raise ValueError(f"{p}: expected a JSON list of objects")
        return list(obj)
    if suffix == ".parquet":
        import pandas as pd

        try:
            return pd.read_parquet(p).to_dict(orient="records")
        except Exception as exc:  # pyarrow raises several types for corrupt files
            raise ValueError(f"{p}: cannot read parquet ({exc})") from None
    raise ValueError(f"unsupported input type {p.suffix!r} for {p}: expected .jsonl, .json or .parquet")


_HUB_NAME_RE = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def looks_like_hub_name(name: str) -> bool:
    """``owner/name`` that is not an existing local path."""
    return bool(_HUB_NAME_RE.match(name)) and not Path(name).exists()


def load_hub_dataset(name: str, split: str, config: str | None = None) -> list[dict[str, Any]]:
    """Records of a Hugging Face hub dataset via ``datasets.load_dataset`` (needs network access)."""
    try:
        import datasets
    except ImportError:
        raise ValueError(f"{name!r} looks like a hub dataset but the 'datasets' package is not installed") from None
    try:
        ds = datasets.load_dataset(name, config, split=split)
    except Exception as exc:  # offline, unknown name/split, auth...
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ValueError(f"cannot load hub dataset {name!r} (split {split!r}): {first}") from None
    return [dict(r) for r in ds]


def select_records(records: Sequence[dict[str, Any]], limit: int | None, seed: int | None) -> list[tuple[int, dict[str, Any]]]:
    """``(source_index, record)`` pairs: shuffled with ``seed`` if given, then the first ``limit``."""
    if limit is not None and limit < 0:
        raise ValueError(f"--limit must be >= 0, got {limit}")
    pairs = list(enumerate(records))
    if seed is not None:
        random.Random(seed).shuffle(pairs)
    if limit is not None:
        pairs = pairs[:limit]
    return pairs


def get_path(record: Any, key: str) -> Any:
    """``record[key]``, where a dotted key (``reward_model.ground_truth``) walks nested dicts; None if absent."""
    value = record
    for part in key.split("."):
        if not isinstance(value, dict):
            return None
        value = value.get(part)
    return value


def find_key(record: dict[str, Any], keys: Iterable[str], what: str, where: str) -> tuple[str, Any]:
    """``(key, value)`` of the first present, non-empty (possibly dotted) key; a precise error otherwise."""
    keys = list(keys)
    for k in keys:
        v = get_path(record, k)
        if v is not None and not (isinstance(v, str) and not v.strip()):
            return k, v
    raise ValueError(f"{where}: no {what} field (looked for {', '.join(keys)}; found {', '.join(sorted(record)) or 'none'})")


def first_key(record: dict[str, Any], keys: Iterable[str], what: str, where: str) -> Any:
    """Value of the first present, non-empty key (see :func:`find_key`)."""
    return find_key(record, keys, what, where)[1]


def add_input_argument(ap: Any, help_text: str) -> None:
    """``INPUT`` as a positional argument or as ``--input INPUT`` (both spellings appear in the recipes)."""
    ap.add_argument("input", nargs="?", help=help_text)
    ap.add_argument("--input", dest="input_opt", metavar="INPUT", help="same as the positional INPUT")


def resolve_input(args: Any) -> str:
    """The one input given either way; a precise error when it is missing or given twice differently."""
    if args.input and args.input_opt and args.input != args.input_opt:
        raise ValueError(f"two different inputs given: {args.input!r} and --input {args.input_opt!r}")
    value = args.input or args.input_opt
    if not value:
        raise ValueError("no input given (pass INPUT or --input INPUT)")
    return str(value)


def run_cli(main: Callable[[list[str] | None], int], argv: list[str] | None = None) -> int:
    """Run ``main``; a ``ValueError`` becomes ``error: <message>`` on stderr and exit status 2."""
    try:
        return main(argv)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
