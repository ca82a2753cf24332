"""The replay store beside verl's checkpoint: ``global_step_<N>/dyjr_replay_state.pkl``.

The file holds ``{"store": store.state_dict(), "rng": ..., "extra": {...}}``. A store refuses a
state it cannot read (e.g. DyJR's buffer before its compact stored rows) with a ``ValueError``;
:func:`restore_store` turns that into one :class:`ReplayStateError` line naming the file and what to
do, instead of a failure somewhere inside the store.
"""

from __future__ import annotations

import os
import pickle
from typing import Any, Optional

__all__ = ["BUFFER_CKPT_NAME", "ReplayStateError", "save_replay_state", "load_replay_state", "restore_store"]

BUFFER_CKPT_NAME = "dyjr_replay_state.pkl"


class ReplayStateError(RuntimeError):
    """A replay-state file this version cannot resume from (one line saying why and what to do)."""


def save_replay_state(folder: str, state: dict[str, Any]) -> str:
    """Write ``state`` atomically (temp file + rename) into ``folder``; returns the path."""
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, BUFFER_CKPT_NAME)
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        pickle.dump(state, f)
    os.replace(tmp, path)
    return path


def load_replay_state(folder: Optional[str]) -> tuple[Optional[str], Optional[dict[str, Any]]]:
    """(path, state) of the replay state in ``folder``; (path or None, None) when there is none."""
    path = os.path.join(folder, BUFFER_CKPT_NAME) if folder else None
    if not path or not os.path.exists(path):
        return path, None
    with open(path, "rb") as f:
        state = pickle.load(f)
    if not isinstance(state, dict) or "store" not in state:
        raise ReplayStateError(f"{path} is not a replay-state file (no 'store' entry)")
    return path, state


def restore_store(store: Any, state: dict[str, Any], path: str) -> None:
    """``store.load_state_dict(state["store"])``, with a refusal reported as one line."""
    try:
        store.load_state_dict(state["store"])
    except (ValueError, KeyError, TypeError) as exc:
        raise ReplayStateError(
            f"{path}: cannot resume the replay store ({exc}); resume with the dyjr-verl version that wrote it, "
            "or move the file away to resume with an empty store"
        ) from None
