"""The replay store inside verl's checkpoint: ``global_step_<N>/actor/dyjr_replay_state.pkl``.

Why ``actor/``: verl 0.9.1 rotates checkpoints (``trainer.max_actor_ckpt_to_keep``) by deleting the
``global_step_<N>/actor`` folders only, and its Megatron checkpoint manager uploads exactly that
folder to ``trainer.default_hdfs_dir`` (``verl.utils.hdfs_io.copy``; verl's FSDP manager uploads
nothing). A state file in it is removed and copied with the actor's shards. The trainer writes it
*before* verl's save, whose last step is the completion marker ``latest_checkpointed_iteration.txt``,
so every checkpoint verl resumes from has its replay state.

The file holds ``{"store": store.state_dict(), "rng": ..., "fingerprint": {...}, "extra": {...}}``.
The fingerprint names what the saved rows mean and how they are laid out (method, store, top-k
record, ...); a resume whose fingerprint differs, a state the store cannot read, or a resume without
a state is one :class:`ReplayStateError` line naming what differs and what to do.

The fingerprint is also written beside it as ``dyjr_replay_state.json``, so that the start-up check
(:mod:`dyjr_verl.preflight`) compares it with the config before Ray starts without unpickling a
store that may take gigabytes; the trainer checks the pickle's own copy again on load.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import pickle
from typing import Any, Optional

__all__ = [
    "BUFFER_CKPT_NAME", "ReplayStateError", "replay_state_folder", "save_replay_state", "load_replay_state",
    "check_fingerprint", "restore_store", "FINGERPRINT_NAME", "read_fingerprint", "resume_folder",
    "missing_state_error", "start_empty_remedy", "mismatch_remedy",
]

BUFFER_CKPT_NAME = "dyjr_replay_state.pkl"
#: the pickle's fingerprint as JSON, for the start-up check (see the module docstring)
FINGERPRINT_NAME = "dyjr_replay_state.json"
#: the sub-folder of ``global_step_<N>`` that verl rotates and uploads (see the module docstring)
STATE_SUBFOLDER = "actor"


class ReplayStateError(RuntimeError):
    """A replay state this run cannot resume from (one line saying why and what to do)."""


def replay_state_folder(step_folder: str) -> str:
    """Where the replay state of checkpoint ``global_step_<N>`` lives."""
    return os.path.join(step_folder, STATE_SUBFOLDER)


def _write_atomic(path: str, write: Any, mode: str = "wb") -> None:
    """``write(file)`` into a temp file renamed to ``path``: a crash never leaves half a file."""
    with open(path + ".tmp", mode) as f:
        write(f)
    os.replace(path + ".tmp", path)


def save_replay_state(folder: str, state: dict[str, Any]) -> str:
    """Write ``state`` atomically (temp file + rename) into ``folder``, then its fingerprint as
    :data:`FINGERPRINT_NAME` when it has one; returns the pickle's path."""
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, BUFFER_CKPT_NAME)
    _write_atomic(path, lambda f: pickle.dump(state, f))
    fingerprint = state.get("fingerprint")
    if fingerprint is not None:
        _write_atomic(os.path.join(folder, FINGERPRINT_NAME), lambda f: json.dump({"fingerprint": fingerprint}, f), "w")
    return path


def read_fingerprint(folder: str) -> Optional[dict[str, Any]]:
    """``{"fingerprint": ...}`` from the JSON beside the replay state in ``folder`` (None when absent)."""
    path = os.path.join(folder, FINGERPRINT_NAME)
    if not os.path.exists(path):
        return None
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as exc:
        raise ReplayStateError(f"{path} is not readable ({exc}): move the checkpoint away") from None


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


def start_empty_remedy(empty_key: str) -> str:
    return f"move the file away and set {empty_key}=true to start with an empty store"


def mismatch_remedy(empty_key: str) -> str:
    """What to do about a fingerprint mismatch (the start-up check and the trainer say the same)."""
    return f"resume with the settings it was saved with, or {start_empty_remedy(empty_key)}"


def missing_state_error(step: int, path: str, empty_key: str) -> ReplayStateError:
    """The refusal of a resume at ``step`` whose checkpoint has no replay state (``empty_key`` false)."""
    return ReplayStateError(f"resuming at step {step}, but {path} does not exist: resume from a checkpoint saved "
                            f"with its replay state, or set {empty_key}=true to start with an empty store")


def resume_folder(trainer: Any) -> Optional[str]:
    """The ``global_step_<N>`` folder verl 0.9.1 will resume from, as its v1 trainer's
    ``_load_checkpoint`` finds it (``verl/trainer/ppo/v1/trainer_base.py``); None: it starts from
    scratch (``resume_mode=disable``, no completed checkpoint, or a setting verl refuses itself)."""
    from verl.utils.checkpoint.checkpoint_manager import find_latest_ckpt_path

    if trainer.resume_mode == "auto":
        root = trainer.default_local_dir
        with contextlib.redirect_stdout(io.StringIO()):  # verl prints its search; its trainer prints it again
            return find_latest_ckpt_path(root if os.path.isabs(root) else os.path.join(os.getcwd(), root))
    path = trainer.resume_from_path
    if trainer.resume_mode == "resume_path" and isinstance(path, str) and "global_step_" in path:
        return path if os.path.isabs(path) else os.path.join(os.getcwd(), path)
    return None


def check_fingerprint(state: dict[str, Any], current: dict[str, Any], path: str, remedy: str) -> None:
    """Refuse a state whose fingerprint differs from this run's, naming every difference on one line."""
    saved = state.get("fingerprint")
    if saved is None:
        raise ReplayStateError(f"{path} has no compatibility fingerprint (written by an older dyjr-verl): {remedy}")

    def show(values: dict[str, Any], key: str) -> str:
        return repr(values[key]) if key in values else "absent"

    diffs = [f"{key}: saved {show(saved, key)}, now {show(current, key)}"
             for key in sorted(set(saved) | set(current)) if show(saved, key) != show(current, key)]
    if diffs:
        raise ReplayStateError(f"{path} was saved with other replay settings ({'; '.join(diffs)}): {remedy}")


def restore_store(store: Any, state: dict[str, Any], path: str, remedy: str = "move the file away") -> None:
    """``store.load_state_dict(state["store"])``, with a refusal reported as one line."""
    try:
        store.load_state_dict(state["store"])
    except (ValueError, KeyError, TypeError) as exc:
        raise ReplayStateError(
            f"{path}: cannot resume the replay store ({exc}); resume with the dyjr-verl version that wrote it, "
            f"or {remedy}"
        ) from None
