"""Hydra recipes composed on verl's ppo_trainer, shipped as package data (wheel and editable installs)."""

from __future__ import annotations

from pathlib import Path

def recipes_dir() -> Path:
    """Absolute directory of the shipped recipes (use it as ``--config-path``)."""
    return Path(__file__).resolve().parent


def recipe_names() -> list[str]:
    """Every launchable recipe (fragments, named ``_*.yaml``, are composed by them)."""
    return sorted(p.stem for p in recipes_dir().glob("*.yaml") if not p.name.startswith("_"))
