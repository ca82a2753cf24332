"""A content digest of a replay store's saved state (checkpoint/resume checks and logs).

Pickled bytes are not comparable across processes (tensor storages, dict order of payloads), so
the digest covers what defines the store: its step and window and, per block in order, every
trajectory's identity, reward and token/log-prob arrays.
"""

from __future__ import annotations

import hashlib
from typing import Any

import numpy as np

_ARRAYS = ("prompt_ids", "response_ids", "response_mask", "logprobs")


def buffer_digest(state: dict[str, Any]) -> str:
    h = hashlib.sha256()
    h.update(repr((state.get("step"), state.get("window"))).encode())
    for block_step, trajectories in state.get("blocks", []):
        h.update(repr(block_step).encode())
        for t in trajectories:
            h.update(repr((t["uid"], int(t["step"]), float(t["reward"]))).encode())
            for key in _ARRAYS:
                arr = np.ascontiguousarray(np.asarray(t[key]))
                h.update(str(arr.dtype).encode() + arr.tobytes())
    return h.hexdigest()[:16]
