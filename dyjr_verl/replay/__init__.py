"""Replay storage: the Time-Sensitive Dynamic Buffer (numpy only; no torch/verl import)."""

from dyjr_verl.replay.buffer import TimeSensitiveBuffer, Trajectory

__all__ = ["TimeSensitiveBuffer", "Trajectory"]
