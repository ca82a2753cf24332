"""Rule-based rewards for verl's custom-reward hook (``reward.custom_reward_function``).

* :mod:`dyjr_verl.rewards.math` — ``\\boxed{}`` answer extraction + Math-Verify, hard per-sample deadline.
* :mod:`dyjr_verl.rewards.final_number` — the last number stated in the response against the gold (small
  chat models that answer in prose, e.g. SmolLM2 in the collapse experiment).
* :mod:`dyjr_verl.rewards.sql` — Text-to-SQL execution match in a read-only SQLite sandbox.
* :mod:`dyjr_verl.rewards.deadline` — the kill-and-replace process pool both use.

verl config: ``reward.custom_reward_function.path=pkg://dyjr_verl.rewards.math`` and ``.name=compute_score``
(or ``compute_score_async``). Submodules are imported on attribute access only, so importing this
package stays cheap (verl imports plugins in every process).
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = ["deadline", "final_number", "math", "sql", "bool_option", "check_kwargs"]

#: Keywords verl's reward managers add to every call when a reward-model router is configured
#: (``experimental/reward_loop/reward_manager/*.py``); accepted and ignored, they are not options.
VERL_CALL_KWARGS = frozenset({"reward_router_address", "reward_model_tokenizer"})


def check_kwargs(reward: str, kwargs: Any, accepted: Any) -> None:
    """Refuse keywords the reward does not know: a misspelt ``reward_kwargs`` key must not be ignored."""
    unknown = sorted(set(kwargs) - set(accepted) - VERL_CALL_KWARGS)
    if unknown:
        raise ValueError(
            f"{reward}: unknown reward_kwargs key(s) {', '.join(unknown)}; accepted: {', '.join(sorted(accepted))}"
        )


def bool_option(name: str, value: Any) -> bool:
    """A boolean reward kwarg; also accepts the strings that Hydra/CLI overrides can produce."""
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "1", "yes", "false", "0", "no"):
        return value.strip().lower() in ("true", "1", "yes")
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    raise ValueError(f"{name} must be a boolean, got {value!r}")


def __getattr__(name: str) -> Any:
    if name in ("deadline", "final_number", "math", "sql"):
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
