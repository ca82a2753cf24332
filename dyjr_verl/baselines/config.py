"""Re-exports: the ``rlep:`` / ``exgrpo:`` nodes are :mod:`dyjr_verl.methods.rlep.config` and
:mod:`dyjr_verl.methods.exgrpo.config`."""

from dyjr_verl.methods.exgrpo.config import ExGRPOConfig, ExGRPOLossConfig, ExGRPOPoolConfig, ExGRPOSelectConfig
from dyjr_verl.methods.rlep.config import RLEPConfig

__all__ = ["RLEPConfig", "ExGRPOPoolConfig", "ExGRPOSelectConfig", "ExGRPOLossConfig", "ExGRPOConfig"]
