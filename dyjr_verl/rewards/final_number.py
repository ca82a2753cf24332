"""Reward on the final stated number: 1.0 when the last number in the response equals the gold.

For small chat models that state an answer in prose ("so he has 3 + 5 = 8 apples.", "The final answer
is 8.") but never write ``\\boxed{}`` (SmolLM2-135M-Instruct, docs/smollm2.md): the math reward's
``boxed`` / ``Answer:`` extraction would score almost every such response 0 and give GRPO no signal.
Only plain numbers are compared (integers and decimals, thousands commas dropped), so no Math-Verify
pool is needed. Same verl contract and result keys as :mod:`dyjr_verl.rewards.math`.

    reward.custom_reward_function.path=pkg://dyjr_verl.rewards.final_number
"""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation
from typing import Any

from dyjr_verl.rewards import check_kwargs
from dyjr_verl.rewards.math import SCORE_CORRECT, SCORE_WRONG

__all__ = ["compute_score", "final_number"]

_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def _value(s: str) -> Decimal | None:
    try:
        return Decimal(s.replace(",", ""))
    except InvalidOperation:
        return None


def final_number(text: str) -> str | None:
    """The last number in ``text`` (commas removed), else ``None``."""
    last = None
    for last in _NUMBER.finditer(text):
        pass
    return None if last is None else last.group(0).replace(",", "").rstrip(",")


def compute_score(data_source: str | None = None, solution_str: str | None = None, ground_truth: Any = None,
                  extra_info: dict[str, Any] | None = None, **kwargs: Any) -> dict[str, Any]:
    check_kwargs("dyjr_verl.rewards.final_number", kwargs, ())
    if ground_truth is None or _value(str(ground_truth).strip()) is None:
        raise ValueError(f"ground_truth must be a plain number, got {ground_truth!r}")
    pred = final_number("" if solution_str is None else str(solution_str))
    ok = pred is not None and _value(pred) == _value(str(ground_truth).strip())
    status = "no_answer" if pred is None else ("correct" if ok else "wrong")
    return {"score": SCORE_CORRECT if ok else SCORE_WRONG, "acc": ok, "pred": pred or "", "timeout": False,
            "format_ok": pred is not None, "status": status}
