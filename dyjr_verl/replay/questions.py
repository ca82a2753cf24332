"""Question identity: the key every question-keyed store uses (RLEP's and Ex-GRPO's pools).

:func:`question_key` is a digest of the chat messages (and data source) of a training row, i.e. of
what verl's ``RLHFDataset`` hands to the rollout as ``raw_prompt``. An offline collection computes
it from the parquet's ``prompt`` column and the trainer from each TransferQueue row's
``raw_prompt``, so a store survives shuffling, subsetting and re-indexing of the training file
(``extra_info.index`` is optional in verl's schema and often 0).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import Any

import numpy as np

__all__ = ["KeyedByQuestion", "plain", "normalise_messages", "question_key"]


def plain(x: Any) -> Any:
    """numpy arrays / tensordict LinkedLists / tuples -> lists, recursively (json-able)."""
    if isinstance(x, Mapping):
        return {str(k): plain(v) for k, v in x.items()}
    if isinstance(x, np.ndarray):
        return [plain(v) for v in x.tolist()]
    if isinstance(x, (list, tuple)):
        return [plain(v) for v in x]
    if isinstance(x, np.generic):
        return x.item()
    return x


def normalise_messages(raw_prompt: Any) -> list[list[Any]]:
    """Chat messages as ``[[role, content], ...]`` with plain python values.

    A bare string is one user message, so a pool built from a plain-text prompt column matches.
    """
    messages = plain(raw_prompt)
    if isinstance(messages, str):
        return [["user", messages]]
    if isinstance(messages, Mapping):
        messages = [messages]
    out = []
    for m in messages:
        if isinstance(m, Mapping):
            out.append([str(m.get("role", "")), m.get("content", "")])
        else:
            out.append(["", m])
    return out


def question_key(raw_prompt: Any, data_source: Any = None) -> str:
    """Stable 16-hex-digit identity of a training question (see the module docstring)."""
    payload = json.dumps(
        [None if data_source is None else str(data_source), normalise_messages(raw_prompt)],
        ensure_ascii=False, sort_keys=True, default=str, separators=(",", ":"),
    )
    return hashlib.sha1(payload.encode("utf-8")).hexdigest()[:16]


class KeyedByQuestion:
    """A store keyed by :func:`question_key`: ``len`` counts its questions, ``in`` tests a key.
    Subclasses name their question dict in :meth:`_by_question`."""

    def _by_question(self) -> Mapping[str, Any]:
        raise NotImplementedError

    def __len__(self) -> int:
        return len(self._by_question())

    def __contains__(self, key: object) -> bool:
        return key in self._by_question()
