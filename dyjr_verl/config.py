"""Re-exports of the typed config nodes (kept for ``from dyjr_verl.config import ...``): the
machinery is :mod:`dyjr_verl.replay.config`, DyJR's node :mod:`dyjr_verl.methods.dyjr.config`, the
``diagnostics:`` node :mod:`dyjr_verl.diagnostics.config`."""

from dyjr_verl.diagnostics.config import DiagnosticsConfig
from dyjr_verl.methods.dyjr.config import BufferConfig, DyJRConfig, JSConfig
from dyjr_verl.replay.config import Checker, ConfigError, ConfigNode, ReplayConfig

__all__ = ["ConfigError", "Checker", "ConfigNode", "ReplayConfig", "BufferConfig", "JSConfig", "DyJRConfig",
           "DiagnosticsConfig"]
