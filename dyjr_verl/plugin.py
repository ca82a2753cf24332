"""verl plugin entry point (group ``verl.plugins``): loaded by ``import verl`` in every verl process.

It must stay light and idempotent: no CUDA initialisation, no heavy imports. It

1. turns on the CPU runtime when the host has no accelerator (:mod:`dyjr_verl.compat`);
2. registers each dyjr component with its verl registry *when that registry's module is imported*
   (so a vLLM server process never imports the trainer just to register a trainer class).

verl swallows plugin import errors at DEBUG level; this module reports its own failures at ERROR
level on stderr and keeps them in :data:`LOAD_ERRORS`, which ``python -m dyjr_verl doctor`` and the
recipes' start-up check turn into a non-zero exit.
"""

from __future__ import annotations

import importlib
import logging
import os
import sys
import traceback
from dataclasses import dataclass

logger = logging.getLogger("dyjr_verl")


@dataclass(frozen=True)
class Component:
    kind: str  # platform | policy_loss | trainer | reward
    name: str  # the name users select it by in verl's config
    provider: str  # our module that performs the registration (or defines the function)
    registry_module: str | None  # verl module whose import triggers the registration
    cpu_only: bool = False


COMPONENTS: tuple[Component, ...] = (
    Component("platform", "cpu", "dyjr_verl.compat.cpu_platform", None, cpu_only=True),
    Component("policy_loss", "dyjr_js", "dyjr_verl.losses.js", "verl.trainer.ppo.core_algos"),
    Component("trainer", "sync_rank_k", "dyjr_verl.trainer.probe", "verl.trainer.ppo.v1"),
    Component("trainer", "dyjr", "dyjr_verl.trainer.replay_trainer", "verl.trainer.ppo.v1"),
    Component("trainer", "rlep", "dyjr_verl.trainer.rlep", "verl.trainer.ppo.v1"),
    Component("trainer", "exgrpo", "dyjr_verl.trainer.exgrpo", "verl.trainer.ppo.v1"),
    Component("reward", "dyjr_verl.rewards.math", "dyjr_verl.rewards.math", None),
    Component("reward", "dyjr_verl.rewards.sql", "dyjr_verl.rewards.sql", None),
)

LOAD_ERRORS: list[str] = []
_loaded = False


def _report(what: str) -> None:
    message = f"dyjr_verl plugin: {what} (pid {os.getpid()})"
    LOAD_ERRORS.append(message)
    print(f"ERROR {message}\n{traceback.format_exc()}", file=sys.stderr, flush=True)


def _register(component: Component):
    def hook(_module=None) -> None:
        try:
            importlib.import_module(component.provider)
        except Exception:
            _report(f"failed to register {component.kind} '{component.name}' from {component.provider}")

    return hook


def load() -> None:
    """Idempotent: activate the CPU runtime if needed and schedule every registration."""
    global _loaded
    if _loaded:
        return
    _loaded = True
    try:
        from dyjr_verl import compat

        compat.activate()
    except Exception:
        _report("failed to activate the CPU runtime")
        return
    from dyjr_verl.importhooks import when_imported

    for component in COMPONENTS:
        if component.cpu_only and not compat.is_active():
            continue
        if component.registry_module is None:
            continue  # registered by activation itself (platform) or looked up by path (rewards)
        when_imported(component.registry_module, _register(component))


load()
