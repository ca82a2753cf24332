"""An in-memory stand-in for verl's TransferQueue client (``kv_batch_get`` with ``select_fields``,
``kv_batch_put``, ``kv_clear``), for testing the replay strategies without Ray.

Rows are stored per (partition, key) as field -> per-row value, with each field's layout (jagged
or dense) as it was written; reads rebuild that layout. Like the real store, reading a key that
does not exist or a field a key lacks is an error, and every call is logged in ``calls``.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import torch
from tensordict import NonTensorStack, TensorDict
from transfer_queue import KVBatchMeta


class FakeTransferQueue:
    def __init__(self) -> None:
        self.rows: dict[tuple[str, str], dict[str, Any]] = {}
        self.tags: dict[tuple[str, str], dict] = {}
        self.layout: dict[str, str] = {}  # field -> "jagged" | "dense" | "object"
        self.calls: list[tuple[str, int, Optional[tuple]]] = []  # (op, rows, fields)

    # -- the client ------------------------------------------------------------------------------------
    def kv_batch_put(self, keys: Sequence[str], partition_id: str, fields: Optional[TensorDict] = None,
                     tags: Optional[Sequence[dict]] = None) -> KVBatchMeta:
        self.calls.append(("put", len(keys), tuple(fields.keys()) if fields is not None else None))
        names = list(fields.keys()) if fields is not None else []
        columns = {name: self._column(fields.get(name), len(keys), name) for name in names}
        for i, key in enumerate(keys):
            row = self.rows.setdefault((partition_id, key), {})
            row.update({name: columns[name][i] for name in names})
            if tags is not None:
                self.tags[(partition_id, key)] = dict(tags[i])
        known = sorted(set().union(*(self.rows[(partition_id, k)].keys() for k in keys))) if keys else []
        return KVBatchMeta(partition_id=partition_id, keys=list(keys),
                           tags=[self.tags.get((partition_id, k), {}) for k in keys], fields=known)

    def kv_batch_get(self, keys: Sequence[str], partition_id: str, select_fields: Optional[Sequence[str]] = None) -> TensorDict:
        self.calls.append(("get", len(keys), tuple(select_fields) if select_fields is not None else None))
        rows = []
        for key in keys:
            if (partition_id, key) not in self.rows:
                raise KeyError(f"no row {key!r} in partition {partition_id!r}")
            rows.append(self.rows[(partition_id, key)])
        names = list(select_fields) if select_fields is not None else list(rows[0].keys())
        out: dict[str, Any] = {}
        for name in names:
            missing = [k for k, r in zip(keys, rows) if name not in r]
            if missing:
                raise KeyError(f"field {name!r} missing for keys {missing}")
            values = [r[name] for r in rows]
            kind = self.layout[name]
            if kind == "jagged":
                out[name] = torch.nested.as_nested_tensor([v.contiguous() for v in values], layout=torch.jagged)
            elif kind == "dense":
                out[name] = torch.stack(values)
            else:
                out[name] = NonTensorStack(*values)
        return TensorDict(out, batch_size=[len(keys)])

    def kv_clear(self, keys: Sequence[str], partition_id: str) -> None:
        self.calls.append(("clear", len(keys), None))
        for key in keys:
            self.rows.pop((partition_id, key), None)
            self.tags.pop((partition_id, key), None)

    # -- helpers for tests -----------------------------------------------------------------------------
    def keys(self, partition_id: str = "train") -> list[str]:
        return [k for (p, k) in self.rows if p == partition_id]

    def _column(self, value: Any, n: int, name: str) -> list:
        if isinstance(value, torch.Tensor):
            self.layout[name] = "jagged" if value.is_nested else "dense"
            return [v.clone() for v in value.unbind(0)]
        self.layout[name] = "object"
        return list(value.tolist()) if hasattr(value, "tolist") else [value] * n


def jagged(rows: Sequence[Sequence[float]], dtype: torch.dtype) -> torch.Tensor:
    return torch.nested.as_nested_tensor([torch.tensor(r, dtype=dtype) for r in rows], layout=torch.jagged)
