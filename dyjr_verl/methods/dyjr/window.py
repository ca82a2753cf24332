"""The window W of DyJR's time-sensitive buffer (:mod:`.buffer`) and its adaptive rule.

Reconstruction (the paper's rule is unknown). W is an integer in ``[min_age, max_age]`` and starts
at ``max_age``; with ``window: fixed`` it stays there and drift is recorded for metrics only.

After each step the trainer reports ``drift = mean |log pi_theta(y_t) - l_t|`` over the
replayed tokens of that step (``replay/drift`` from :mod:`dyjr_verl.replay.loss`),
where ``l_t`` is the stored log-prob. Stale anchors make this large, so:

* ``drift > drift_high`` (default 0.2): ``W = max(min_age, W - shrink_step)`` at once, and
  entries now outside the window are evicted;
* ``drift < drift_low`` (default 0.05) for ``grow_patience`` (default 2) consecutive reports:
  ``W = min(max_age, W + grow_step)``;
* otherwise (or a non-finite / missing drift): ``W`` is kept and the calm streak resets
  (missing drift leaves the streak unchanged).
"""

from __future__ import annotations

import math
from typing import Any, Optional

from dyjr_verl.methods.dyjr.config import BufferConfig

__all__ = ["DriftWindow"]


class DriftWindow:
    """W, the calm streak and the last drift (module docstring); the buffer evicts on a shrink."""

    def __init__(self, config: BufferConfig):
        self.config = config
        self.size = config.max_age
        self.calm = 0
        self.last_drift: Optional[float] = None

    def report(self, drift: Optional[float]) -> bool:
        """Apply the rule to one drift measurement; True when W shrank."""
        if drift is None:
            return False
        drift = float(drift)
        if not math.isfinite(drift):
            self.calm = 0
            return False
        self.last_drift = drift
        cfg = self.config
        if cfg.window != "adaptive":
            return False
        if drift > cfg.drift_high:
            shrunk = self.size > cfg.min_age
            self.size = max(cfg.min_age, self.size - cfg.shrink_step)
            self.calm = 0
            return shrunk
        if drift < cfg.drift_low:
            self.calm += 1
            if self.calm >= cfg.grow_patience:
                self.size = min(cfg.max_age, self.size + cfg.grow_step)
                self.calm = 0
        else:
            self.calm = 0
        return False

    def state_dict(self) -> dict[str, Any]:
        return {"window": self.size, "calm": self.calm, "last_drift": self.last_drift}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """The current config wins: a fixed window is ``max_age``, an adaptive one is clipped to
        ``[min_age, max_age]``."""
        cfg = self.config
        window = int(state["window"]) if cfg.window == "adaptive" else cfg.max_age
        self.size = min(cfg.max_age, max(cfg.min_age, window))
        self.calm = int(state["calm"])
        self.last_drift = state["last_drift"]
