"""Hydra recipes composed on verl's ppo_trainer, shipped as package data (wheel and editable installs)."""

from __future__ import annotations

from pathlib import Path

def recipes_dir() -> Path:
    """Absolute directory of the shipped recipes (use it as ``--config-path``)."""
    return Path(__file__).resolve().parent


def recipe_names() -> list[str]:
    """Every launchable recipe (fragments, named ``_*.yaml``, are composed by them)."""
    return sorted(p.stem for p in recipes_dir().glob("*.yaml") if not p.name.startswith("_"))


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="dyjr-verl recipes", description="Print the shipped recipes directory "
                                     "(main_ppo --config-path); --list prints the launchable recipe names.")
    parser.add_argument("--list", action="store_true")
    args = parser.parse_args(argv)
    print("\n".join(recipe_names()) if args.list else recipes_dir())
    return 0
