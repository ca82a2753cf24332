"""verl plugin entry point (group ``verl.plugins``): loaded by ``import verl`` in every verl process.

It must stay light and idempotent: no CUDA initialisation, no heavy imports. It

1. turns on the CPU runtime when the host has no accelerator (:mod:`dyjr_verl.compat`);
2. registers each dyjr component with its verl registry *when that registry's module is imported*
   (so a vLLM server process never imports the trainer just to register a trainer class). The
   trainer modes come from the table of methods (:data:`dyjr_verl.methods.METHODS`).

Import order: our trainer modules subclass verl's v1 trainer, so importing one imports
``verl.trainer.ppo.v1``, whose import hook imports every trainer module. When that import was
started by one of our own modules (user code importing a trainer module directly), importing the
others at once would meet a half-initialised base module; the hook defers them instead, and the
last line of every trainer module (:func:`register_pending`) imports them once no module of ours
is still initialising.

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


def _components() -> tuple[Component, ...]:
    from dyjr_verl.methods import METHODS, RANK_K_TRAINER_MODE, RANK_K_TRAINER_MODULE

    v1 = "verl.trainer.ppo.v1"
    return (
        Component("platform", "cpu", "dyjr_verl.compat.cpu_platform", None, cpu_only=True),
        Component("policy_loss", "dyjr_js", "dyjr_verl.methods.dyjr.policy_loss", "verl.trainer.ppo.core_algos"),
        Component("trainer", RANK_K_TRAINER_MODE, RANK_K_TRAINER_MODULE, v1),
        *(Component("trainer", m.trainer_mode, m.trainer_module, v1) for m in METHODS.values()),
        Component("reward", "dyjr_verl.rewards.math", "dyjr_verl.rewards.math", None),
        Component("reward", "dyjr_verl.rewards.sql", "dyjr_verl.rewards.sql", None),
    )


COMPONENTS: tuple[Component, ...] = _components()

LOAD_ERRORS: list[str] = []
_loaded = False


def _report(what: str) -> None:
    message = f"dyjr_verl plugin: {what} (pid {os.getpid()})"
    LOAD_ERRORS.append(message)
    print(f"ERROR {message}\n{traceback.format_exc()}", file=sys.stderr, flush=True)


_PENDING: list[Component] = []


def _own_import_running(caller: str | None = None) -> bool:
    """Whether one of our modules (other than ``caller``) is being imported right now."""
    return any(
        getattr(getattr(module, "__spec__", None), "_initializing", False)
        for name, module in list(sys.modules.items())
        if name.startswith("dyjr_verl.") and name != caller and module is not None
    )


def register_pending(caller: str) -> None:
    """The registrations deferred while our own import ran (module docstring); the last line of
    every trainer module, a no-op unless its import started verl's v1 package."""
    if _own_import_running(caller):
        return
    while _PENDING:
        _import_provider(_PENDING.pop(0))


def _import_provider(component: Component) -> None:
    try:
        importlib.import_module(component.provider)
    except Exception:
        _report(f"failed to register {component.kind} '{component.name}' from {component.provider}")


def _register(component: Component):
    def hook(_module=None) -> None:
        if component.kind == "trainer" and _own_import_running():
            _PENDING.append(component)  # importing it now would meet a half-initialised module of ours
            return
        _import_provider(component)

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
