"""A verl platform for machines without an accelerator (verl 0.9.1 has none built in).

verl routes every device call through ``verl.plugin.platform`` (``get_platform()``); with no
accelerator it falls back to "nvidia" and dies in NCCL/CUDA calls. This platform answers those
calls for the CPU: gloo for collectives, the CPU as the current device, no-ops for streams, memory
statistics, NVTX and profilers. Ray resource pools in verl 0.9.1 hard-code GPU bundles
(``single_controller/ray/base.py:208``), so the platform keeps the Ray resource name "GPU" and the
CPU recipes declare ``trainer.n_gpus_per_node`` logical GPUs to Ray (``ray_kwargs.ray_init.num_gpus``);
each FSDP rank is then one process on the CPU, talking gloo (``trainer.n_gpus_per_node=2``: dp = 2).

Upstreamable form: ``patches/verl-0.9.1/0001-cpu-platform.diff``.
"""

from __future__ import annotations

import os
import types
from contextlib import contextmanager
from typing import Any, Optional

import torch
from verl.plugin.platform.platform_base import PlatformBase
from verl.plugin.platform.platform_manager import PlatformRegistry

PLATFORM_NAME = "cpu"


def logical_device_count() -> int:
    """Devices this process sees, as CUDA would count them: the logical GPU ids Ray assigned to this
    actor (``CUDA_VISIBLE_DEVICES``), else the logical GPUs declared to this process's Ray cluster
    (``trainer.n_gpus_per_node`` in the CPU recipes), else 1."""
    visible = [d for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
    if visible:
        return len(visible)
    import ray

    if ray.is_initialized():
        return max(1, int(ray.cluster_resources().get("GPU", 1)))
    return 1


class _CpuDeviceModule(types.ModuleType):
    """Stands in for ``torch.cuda`` where verl calls it through ``get_torch_device()``.

    Attributes that ``torch.cpu`` has are forwarded to it; the CUDA-only API verl uses (memory
    statistics, ``mem_get_info``, RNG state, NVTX, device names) gets CPU answers; anything else
    becomes a no-op returning None, so an unforeseen accelerator call cannot crash a CPU run.
    """

    def __init__(self) -> None:
        super().__init__("dyjr_verl_cpu_device")

    # -- answers that differ from a no-op ---------------------------------------------------
    @staticmethod
    def is_available() -> bool:
        return True

    @staticmethod
    def device_count() -> int:
        return logical_device_count()

    @staticmethod
    def current_device() -> int:
        return 0

    @staticmethod
    def get_device_name(device: Any = None) -> str:
        return "CPU"

    @staticmethod
    def mem_get_info(device: Any = None) -> tuple[int, int]:
        return 0, 0

    @staticmethod
    def memory_allocated(device: Any = None) -> int:
        return 0

    memory_reserved = max_memory_allocated = max_memory_reserved = memory_allocated

    @staticmethod
    def get_rng_state(device: Any = None) -> torch.Tensor:
        return torch.get_rng_state()

    @staticmethod
    def set_rng_state(state: torch.Tensor, device: Any = None) -> None:
        torch.set_rng_state(state)

    @staticmethod
    def manual_seed(seed: int) -> None:
        torch.manual_seed(seed)

    manual_seed_all = manual_seed

    @staticmethod
    def memory_stats(device: Any = None) -> dict:
        return {}

    class nvtx:  # noqa: N801 - mirrors torch.cuda.nvtx
        @staticmethod
        @contextmanager
        def range(msg: str, *args, **kwargs):
            yield

        @staticmethod
        def range_push(msg: str) -> None:
            return None

        @staticmethod
        def range_pop() -> None:
            return None

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        if hasattr(torch.cpu, name):
            return getattr(torch.cpu, name)
        return lambda *args, **kwargs: None


CPU_DEVICE_MODULE = _CpuDeviceModule()


@PlatformRegistry.register(platform=PLATFORM_NAME)
class PlatformCPU(PlatformBase):
    """verl platform "cpu": selected with ``VERL_PLATFORM=cpu`` (set by :mod:`dyjr_verl.compat`)."""

    @property
    def device_name(self) -> str:
        return "cpu"

    @property
    def vendor_name(self) -> str:
        return "cpu"

    @property
    def device_module(self) -> types.ModuleType:
        return CPU_DEVICE_MODULE

    def is_available(self) -> bool:
        return True

    def is_platform_available(self, use_smi_check: bool = False) -> bool:
        # Never auto-detected: verl probes registered platforms in order and a CPU is always
        # "available"; selection is explicit through VERL_PLATFORM=cpu.
        return False

    def current_device(self) -> torch.device:  # verl passes this to .to(...) and FSDP2 meshes
        return torch.device("cpu")

    def device_count(self) -> int:
        return logical_device_count()

    def set_device(self, device_index: int) -> None:
        return None

    def synchronize(self, device_index: Optional[int] = None) -> None:
        return None

    def manual_seed(self, seed: int) -> None:
        torch.manual_seed(seed)

    def manual_seed_all(self, seed: int) -> None:
        torch.manual_seed(seed)

    def set_allocator_settings(self, settings: str) -> None:
        return None

    def empty_cache(self) -> None:
        return None

    def get_device_capability(self, device_index: int = 0) -> tuple[Optional[int], Optional[int]]:
        return None, None

    def communication_backend_name(self) -> str:
        return "gloo"

    def visible_devices_envvar(self) -> str:
        return "CUDA_VISIBLE_DEVICES"

    @contextmanager
    def nvtx_range(self, msg: str):
        yield

    def profiler_start(self) -> None:
        return None

    def profiler_stop(self) -> None:
        return None

    def ray_resource_name(self) -> str:
        return "GPU"

    def ray_noset_envvars(self) -> list[str]:
        return ["RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES"]

    def is_ipc_supported(self) -> bool:
        return False

    def cudart(self) -> Any:
        return None
