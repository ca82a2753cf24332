"""Accuracy metrics over k samples per question: greedy accuracy, avg@k and unbiased pass@k.

pass@k uses the unbiased estimator of Chen et al. (2021): with n samples of which c are correct,
pass@k = 1 - C(n-c, k) / C(n, k), averaged over questions (computed as a stable product).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Sequence

import numpy as np


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k for one question with ``n`` samples, ``c`` of them correct."""
    if not 0 <= c <= n:
        raise ValueError(f"need 0 <= c <= n, got c={c}, n={n}")
    if not 1 <= k <= n:
        raise ValueError(f"need 1 <= k <= n, got k={k}, n={n}")
    if n - c < k:
        return 1.0
    # 1 - prod_{i=n-c+1}^{n} (1 - k/i)
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


@dataclass
class QuestionResult:
    benchmark: str
    index: int
    greedy_correct: bool | None  # None when no greedy decode was made
    sample_correct: list[bool] = field(default_factory=list)
    distinct_correct: int = 0  # distinct correct responses (a diversity measure)


def summarise(results: Iterable[QuestionResult], ks: Sequence[int]) -> dict[str, dict[str, float]]:
    """Per benchmark: n_questions, greedy accuracy, avg@n and pass@k for every k <= samples."""
    by_bench: dict[str, list[QuestionResult]] = {}
    for r in results:
        by_bench.setdefault(r.benchmark, []).append(r)
    table: dict[str, dict[str, float]] = {}
    for bench, rows in sorted(by_bench.items()):
        out: dict[str, float] = {"questions": float(len(rows))}
        greedy = [r.greedy_correct for r in rows if r.greedy_correct is not None]
        if greedy:
            out["greedy"] = float(np.mean(greedy))
        n = min((len(r.sample_correct) for r in rows), default=0)
        if n:
            out[f"avg@{n}"] = float(np.mean([np.mean(r.sample_correct[:n]) for r in rows]))
            for k in ks:
                if k <= n:
                    out[f"pass@{k}"] = float(np.mean([pass_at_k(n, sum(r.sample_correct[:n]), k) for r in rows]))
            out["distinct_correct"] = float(np.mean([r.distinct_correct for r in rows]))
        table[bench] = out
    return table


def to_markdown(table: dict[str, dict[str, float]]) -> str:
    columns: list[str] = []
    for row in table.values():
        columns += [c for c in row if c not in columns]
    lines = ["| benchmark | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for bench, row in table.items():
        cells = [(f"{row[c]:.0f}" if c == "questions" else f"{100 * row[c]:.1f}" if c != "distinct_correct"
                  else f"{row[c]:.2f}") if c in row else "" for c in columns]
        lines.append(f"| {bench} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n\nAccuracies in %; distinct_correct = distinct correct responses per question.\n"
