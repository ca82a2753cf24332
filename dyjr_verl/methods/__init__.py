"""The replay methods, one folder each over the method-agnostic replay core (:mod:`dyjr_verl.replay`).

:data:`METHODS` is the one table of methods: the plugin registers their trainer modes from it, the
start-up check and ``plan`` validate their config nodes with it, ``doctor`` lists them and the
miniature reproduction takes its method list, labels and seed keys from it. Adding a method is a
folder (config node, store, trainer) plus one row here.

The table holds names and module paths only: importing it imports nothing heavy (the plugin reads
it in every verl process).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Method:
    """One replay method.

    name: the method's name (also its hydra node and its trainer mode).
    label: how reports and plots name it.
    config_class: ``module:Class`` of its typed config node.
    trainer_module: the module that registers its trainer mode (``register_trainer``).
    metric_prefix: prefix of its trainer-side metrics.
    recipes: the recipes that run it.
    seed_keys: hydra keys of its own random streams (the replay sampling), besides verl's.
    """

    name: str
    label: str
    config_class: str
    trainer_module: str
    metric_prefix: str
    recipes: tuple[str, ...]
    seed_keys: tuple[str, ...]

    @property
    def config_node(self) -> str:
        return self.name

    @property
    def trainer_mode(self) -> str:
        return self.name

    def config_cls(self) -> Any:
        module, _, cls = self.config_class.partition(":")
        return getattr(importlib.import_module(module), cls)

    def parse(self, node: Any) -> Any:
        """The node parsed and validated (raises ``ConfigError`` with one line per bad value)."""
        return self.config_cls().from_omegaconf(node, path=self.config_node)


METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        Method("dyjr", "DyJR", "dyjr_verl.methods.dyjr.config:DyJRConfig", "dyjr_verl.methods.dyjr.trainer", "dyjr/",
               ("dyjr_tiny_cpu", "dyjr_math", "dyjr_math_megatron", "dyjr_sql_tiny_cpu", "dyjr_sql", "dyjr_smollm2_cpu"),
               ("dyjr.replay.seed",)),
        Method("rlep", "RLEP", "dyjr_verl.methods.rlep.config:RLEPConfig", "dyjr_verl.methods.rlep.trainer", "rlep/",
               ("rlep_tiny_cpu", "rlep_math", "rlep_smollm2_cpu"), ("rlep.seed",)),
        Method("exgrpo", "Ex-GRPO", "dyjr_verl.methods.exgrpo.config:ExGRPOConfig", "dyjr_verl.methods.exgrpo.trainer",
               "exgrpo/", ("exgrpo_tiny_cpu", "exgrpo_math", "exgrpo_smollm2_cpu"), ("exgrpo.replay.seed",)),
    )
}

#: the reference every method is compared with: verl's GRPO (trainer mode ``sync_rank_k`` in the recipes)
BASELINE = "grpo"
BASELINE_LABEL = "GRPO"
#: trainer mode of GRPO with the Rank-k metrics (dyjr_verl.diagnostics.trainer)
RANK_K_TRAINER_MODE = "sync_rank_k"
RANK_K_TRAINER_MODULE = "dyjr_verl.diagnostics.trainer"


def method_for_mode(mode: str) -> Method | None:
    """The method whose trainer mode is ``mode`` (None for verl's own modes and ``sync_rank_k``)."""
    return next((m for m in METHODS.values() if m.trainer_mode == mode), None)
