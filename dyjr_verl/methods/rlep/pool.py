"""RLEP's experience pool (arXiv 2507.07451): question -> verified-correct answer strings.

Static: collected offline (:mod:`.collect`: 64 samples, T=0.7, top-p 0.95, >= 2 correct) or imported
(:mod:`.importer`), keyed by :func:`dyjr_verl.replay.questions.question_key`. Per training group, M
(default 2) candidates are drawn uniformly without replacement. A question with fewer than M
candidates gets only what exists (the official code pads with empty answers that are then scored
as failures; we do not).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Optional

import numpy as np

from dyjr_verl.replay.questions import KeyedByQuestion

__all__ = ["RLEP_POOL_COLUMNS", "RLEPPool"]

RLEP_POOL_COLUMNS = ("question_key", "data_source", "index", "num_samples", "num_correct", "candidates")
_RLEP_META_KEY = b"dyjr_verl.rlep_pool"


class RLEPPool(KeyedByQuestion):
    """question key -> verified-correct answer strings (RLEP's offline experience pool).

    ``min_correct`` is the admission rule (RLEP: >= 2 correct answers out of N samples); it is
    applied when saving and again when loading, so a pool collected with a looser rule can be used
    with a stricter one.
    """

    def __init__(self, entries: Mapping[str, Sequence[str]], *, min_correct: int = 2, meta: Optional[dict] = None):
        if min_correct < 1:
            raise ValueError(f"min_correct must be >= 1, got {min_correct}")
        self.min_correct = int(min_correct)
        self.meta: dict = dict(meta or {})
        self._entries: dict[str, list[str]] = {
            str(k): [str(a) for a in v] for k, v in entries.items() if len(v) >= self.min_correct
        }
        self.dropped = sum(1 for v in entries.values() if len(v) < self.min_correct)

    def _by_question(self) -> dict:
        return self._entries

    @property
    def num_candidates(self) -> int:
        return sum(len(v) for v in self._entries.values())

    def questions(self) -> list[str]:
        return list(self._entries)

    def candidates(self, key: str) -> list[str]:
        return list(self._entries.get(key, ()))

    def draw(self, key: str, m: int, rng: np.random.Generator) -> list[str]:
        """Up to ``m`` distinct candidates of ``key``, uniformly without replacement (fewer when
        the question has fewer; none when it is not in the pool). No filler answers."""
        cands = self._entries.get(key)
        if not cands or m <= 0:
            return []
        k = min(int(m), len(cands))
        idx = rng.choice(len(cands), size=k, replace=False)
        return [cands[int(i)] for i in idx]

    def metrics(self, prefix: str = "pool/") -> dict[str, float]:
        n = len(self)
        return {
            f"{prefix}questions": float(n),
            f"{prefix}candidates": float(self.num_candidates),
            f"{prefix}candidates_mean": float(self.num_candidates / n) if n else 0.0,
        }

    def fingerprint(self) -> str:
        """Content digest (questions and their answers, order-independent)."""
        h = hashlib.sha256()
        for key in sorted(self._entries):
            h.update(key.encode())
            for a in self._entries[key]:
                h.update(b"\0" + a.encode("utf-8"))
            h.update(b"\1")
        return h.hexdigest()[:16]

    def state_dict(self) -> dict[str, Any]:
        """The pool is static, so a checkpoint records only which pool was in use."""
        return {"version": 1, "fingerprint": self.fingerprint(), "questions": len(self), "path": self.meta.get("path")}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Resuming with another pool than the one saved is allowed but reported."""
        if state.get("fingerprint") not in (None, self.fingerprint()):
            import warnings

            warnings.warn(
                f"RLEP pool differs from the checkpoint's ({state.get('path')}, {state.get('questions')} questions)",
                stacklevel=2,
            )

    # -- file format: one parquet row per question ----------------------------------------------
    def save(self, path: str | Path, *, rows: Optional[Iterable[Mapping[str, Any]]] = None) -> Path:
        """Write the pool as parquet (columns :data:`RLEP_POOL_COLUMNS`, settings in the schema
        metadata). ``rows`` may carry per-question ``data_source`` / ``index`` / ``num_samples`` /
        ``num_correct``; questions not in it get nulls."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        extra = {str(r["question_key"]): r for r in (rows or [])}
        table_rows = []
        for key, cands in self._entries.items():
            r = extra.get(key, {})
            table_rows.append({
                "question_key": key,
                "data_source": None if r.get("data_source") is None else str(r["data_source"]),
                "index": None if r.get("index") is None else int(r["index"]),
                "num_samples": None if r.get("num_samples") is None else int(r["num_samples"]),
                "num_correct": int(r.get("num_correct", len(cands))),
                "candidates": list(cands),
            })
        schema = pa.schema([
            ("question_key", pa.string()), ("data_source", pa.string()), ("index", pa.int64()),
            ("num_samples", pa.int64()), ("num_correct", pa.int64()), ("candidates", pa.list_(pa.string())),
        ])
        table = pa.Table.from_pylist(table_rows, schema=schema)
        meta = {**self.meta, "min_correct": self.min_correct}
        table = table.replace_schema_metadata({_RLEP_META_KEY: json.dumps(meta, default=str).encode()})
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(path.suffix + ".tmp")
        pq.write_table(table, tmp)
        tmp.replace(path)
        return path

    @classmethod
    def load(cls, path: str | Path, *, min_correct: int = 2) -> "RLEPPool":
        import pyarrow.parquet as pq

        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(
                f"RLEP experience pool not found: {path} (build it with `python -m dyjr_verl.methods.rlep.collect`)"
            )
        table = pq.read_table(path)
        missing = [c for c in ("question_key", "candidates") if c not in table.column_names]
        if missing:
            raise ValueError(f"{path} is not an RLEP pool: missing columns {missing}")
        raw_meta = (table.schema.metadata or {}).get(_RLEP_META_KEY)
        meta = json.loads(raw_meta) if raw_meta else {}
        entries: dict[str, list[str]] = {}
        for key, cands in zip(table.column("question_key").to_pylist(), table.column("candidates").to_pylist()):
            entries.setdefault(str(key), []).extend(cands or [])
        pool = cls(entries, min_correct=min_correct, meta=meta)
        pool.meta["path"] = str(path)
        return pool
