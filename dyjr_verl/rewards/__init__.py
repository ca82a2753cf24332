"""Rule-based rewards for verl's custom-reward hook (``reward.custom_reward_function``).

* :mod:`dyjr_verl.rewards.math` — ``\\boxed{}`` answer extraction + Math-Verify, hard per-sample deadline.
* :mod:`dyjr_verl.rewards.sql` — Text-to-SQL execution match in a read-only SQLite sandbox.
* :mod:`dyjr_verl.rewards.deadline` — the kill-and-replace process pool both use.

verl config: ``reward.custom_reward_function.path=pkg://dyjr_verl.rewards.math`` and ``.name=compute_score``
(or ``compute_score_async``). Submodules are imported on attribute access only, so importing this
package stays cheap (verl imports plugins in every process).
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = ["deadline", "math", "sql"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
