"""Reading JSON-lines files (data records, saved generations, verl's file-logger metrics) with one
error that names the file and line."""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from typing import Any


def json_lines(lines: Iterable[str], source: str, error: type[Exception] = ValueError,
               hint: str = "") -> Iterator[tuple[int, Any]]:
    """``(line number, value)`` of every non-blank line; a line that is not JSON raises ``error``
    (``source:line: not a JSON line (…)`` + ``hint``). The value's shape is the caller's to check."""
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as exc:
            raise error(f"{source}:{lineno}: not a JSON line ({exc.msg}, column {exc.colno}){hint}") from None
        yield lineno, value
