"""The one table of methods is what the plugin, the start-up check, doctor and the miniature
reproduction read."""

from __future__ import annotations

from dyjr_verl import doctor, plugin, preflight
from dyjr_verl.experiments import commands
from dyjr_verl.experiments import config as experiments
from dyjr_verl.methods import BASELINE, METHODS, method_for_mode
from dyjr_verl.recipes import recipe_names
from dyjr_verl.replay.config import ConfigNode


def test_every_method_is_registered_checked_listed_and_run_from_the_table():
    trainers = {c.name: c.provider for c in plugin.COMPONENTS if c.kind == "trainer"}
    recipes = set(recipe_names())
    for name, m in METHODS.items():
        assert trainers[m.trainer_mode] == m.trainer_module  # plugin
        assert m.trainer_mode in preflight.PROBING_MODES  # start-up check
        assert issubclass(m.config_cls(), ConfigNode) and m.config_cls()().enable  # a node with its defaults
        assert set(m.recipes) <= recipes and set(m.recipes) <= set(doctor.DOCUMENTED_RECIPES)  # doctor
        assert name in experiments.METHODS and experiments.LABELS[name] == m.label  # mini reproduction
        assert commands.METHOD_SEED_KEYS[name] == m.seed_keys
        assert method_for_mode(m.trainer_mode) is m
    assert experiments.METHODS[0] == BASELINE and method_for_mode("sync_rank_k") is None
