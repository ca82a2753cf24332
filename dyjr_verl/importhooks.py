"""Run a function right after a given module is imported (or at once if it already is).

verl loads our plugin in every process, rollout servers included, during ``import verl``; most of
what we register lives in verl modules that a given process may never import (the v1 trainer, the
FSDP engine, vLLM layers). Hooking their import keeps the plugin cheap everywhere and still
guarantees registration before the first lookup.
"""

from __future__ import annotations

import importlib.abc
import sys
from typing import Callable

_HOOKS: dict[str, list[Callable]] = {}


class _PostImportFinder(importlib.abc.MetaPathFinder):
    """Wraps the loader of watched modules so their hooks run right after the module executes."""

    def find_spec(self, fullname, path, target=None):
        if fullname not in _HOOKS:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
                continue
            original_exec = spec.loader.exec_module

            def exec_module(module, _orig=original_exec, _name=fullname):
                _orig(module)
                for hook in _HOOKS.get(_name, []):
                    hook(module)

            spec.loader.exec_module = exec_module
            return spec
        return None


_FINDER = _PostImportFinder()


def when_imported(module_name: str, hook: Callable) -> None:
    """Run ``hook(module)`` now if ``module_name`` is loaded, else right after it is imported."""
    if module_name in sys.modules:
        hook(sys.modules[module_name])
        return
    _HOOKS.setdefault(module_name, []).append(hook)
    if _FINDER not in sys.meta_path:
        sys.meta_path.insert(0, _FINDER)
