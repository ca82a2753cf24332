"""Accuracy metrics over n samples per question: greedy accuracy, mean@n, maj@n and unbiased pass@k.

* ``mean@n``: mean accuracy over the n samples (= avg@n; DyJR's paper reports Mean@256).
* ``maj@n``: the majority answer among the n samples is correct. Votes go by the answer the reward
  extracted: every sample the reward judged correct is one class (the reward already found each equal
  to the gold, with Math-Verify for math), every other extracted answer is its own class by its
  normalised string (see :func:`dyjr_verl.eval.__main__.vote_key`); samples without an answer
  abstain. A tie between j classes scores 1/j when the correct class is among them (the expected
  score of a random tie-break; otherwise maj@2 would depend on sample order). Wrong answers that are
  equivalent but written differently split their vote, so maj@n can be slightly optimistic compared
  with a full pairwise equivalence check (n² Math-Verify calls, too slow at n = 256).
* ``pass@k``: the unbiased estimator of Chen et al. (2021): with n samples of which c are correct,
  pass@k = 1 - C(n-c, k) / C(n, k), averaged over questions, computed as a product of n-c+1..n
  factors in (0, 1] (stable up to n = k = 256 and beyond; no large binomials).

Every question is scored over all of its own samples. When the sample counts of a benchmark differ
(re-scored generations), the columns are named by the range (``mean@4-8``), pass@k is reported only
up to the smallest n (so every question takes part in every k, each estimated from its own n), and a
note says so; questions without samples count for greedy only (noted too).
"""

from __future__ import annotations

from collections import Counter
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
    # C(n-c, k) / C(n, k) = prod_{i=n-c+1}^{n} (1 - k/i)
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


def majority_correct(answers: Sequence[str | None], correct: Sequence[bool]) -> float:
    """maj@n of one question, in [0, 1]: ``answers[i]`` is sample i's normalised answer (``None``: no
    answer), ``correct[i]`` the reward's verdict. See the module docstring for votes and ties."""
    if len(answers) != len(correct):
        raise ValueError(f"{len(answers)} answers for {len(correct)} verdicts")
    votes = Counter(True if ok else a for a, ok in zip(answers, correct) if ok or a)
    if not votes:
        return 0.0
    top = max(votes.values())
    leaders = [key for key, count in votes.items() if count == top]
    return 1.0 / len(leaders) if any(key is True for key in leaders) else 0.0


@dataclass
class QuestionResult:
    benchmark: str
    index: int
    greedy_correct: bool | None  # None when no greedy decode was made
    sample_correct: list[bool] = field(default_factory=list)
    distinct_correct: int = 0  # distinct correct responses (a diversity measure)
    sample_answers: list[str | None] | None = None  # normalised extracted answers (for maj@n); None: unknown


def _pass_at(rows: Sequence[QuestionResult], k: int) -> float:
    return float(np.mean([pass_at_k(len(r.sample_correct), sum(r.sample_correct), k) for r in rows]))


def summarise(results: Iterable[QuestionResult], ks: Sequence[int],
              notes: list[str] | None = None) -> dict[str, dict[str, float]]:
    """Per benchmark: questions, greedy accuracy, mean@n, maj@n (when the reward reports the
    extracted answers) and pass@k for every k in ``ks`` up to n and for k = n. Uneven sample counts
    and questions without samples (see the module docstring) add a sentence to ``notes``."""
    table: dict[str, dict[str, float]] = {}
    for bench, rows in sorted(_by_benchmark(results).items()):
        out: dict[str, float] = {"questions": float(len(rows))}
        greedy = [r.greedy_correct for r in rows if r.greedy_correct is not None]
        if greedy:
            out["greedy"] = float(np.mean(greedy))
        sampled = [r for r in rows if r.sample_correct]
        if sampled:
            lo = min(len(r.sample_correct) for r in sampled)
            hi = max(len(r.sample_correct) for r in sampled)
            n = f"{lo}" if lo == hi else f"{lo}-{hi}"
            out[f"mean@{n}"] = float(np.mean([np.mean(r.sample_correct) for r in sampled]))
            if all(r.sample_answers is not None for r in sampled):
                out[f"maj@{n}"] = float(np.mean([majority_correct(r.sample_answers, r.sample_correct)
                                                 for r in sampled]))
            for k in sorted({*(k for k in ks if k <= lo), lo}):
                out[f"pass@{k}"] = _pass_at(sampled, k)
            out["distinct_correct"] = float(np.mean([r.distinct_correct for r in sampled]))
            if notes is not None and lo != hi:
                notes.append(f"{bench}: sample counts differ between questions ({lo} to {hi}); mean@{n} and maj@{n} "
                             f"are over each question's own samples, pass@k only up to k = {lo} (the smallest n), "
                             "each question's from its own n")
            if notes is not None and len(sampled) < len(rows):
                notes.append(f"{bench}: {len(rows) - len(sampled)} of {len(rows)} questions have no samples; they "
                             "count for greedy only, not for the sample metrics (mean@, maj@, pass@k, distinct_correct)")
        table[bench] = out
    return table


def pass_at_k_curves(results: Iterable[QuestionResult]) -> dict[str, dict[int, float]]:
    """Per benchmark with samples: pass@k at k = 1, 2, 4, ... and at n (the smallest sample count
    of its questions), the points of the pass@k-versus-k plot."""
    curves = {}
    for bench, rows in sorted(_by_benchmark(results).items()):
        sampled = [r for r in rows if r.sample_correct]
        if sampled:
            n = min(len(r.sample_correct) for r in sampled)
            ks = sorted({*(2 ** i for i in range(n.bit_length())), n})
            curves[bench] = {k: _pass_at(sampled, k) for k in ks}
    return curves


def _by_benchmark(results: Iterable[QuestionResult]) -> dict[str, list[QuestionResult]]:
    by_bench: dict[str, list[QuestionResult]] = {}
    for r in results:
        by_bench.setdefault(r.benchmark, []).append(r)
    return by_bench


def to_markdown(table: dict[str, dict[str, float]], notes: Sequence[str] = (), plot: str | None = None) -> str:
    """The table, its legend, then ``notes`` (one bullet each) and the ``plot`` image link."""
    columns: list[str] = []
    for row in table.values():
        columns += [c for c in row if c not in columns]
    lines = ["| benchmark | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for bench, row in table.items():
        cells = [(f"{row[c]:.0f}" if c == "questions" else f"{100 * row[c]:.1f}" if c != "distinct_correct"
                  else f"{row[c]:.2f}") if c in row else "" for c in columns]
        lines.append(f"| {bench} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + (
        "\n\nAccuracies in %. mean@n: mean accuracy over the n samples; maj@n: the majority extracted answer "
        "is correct; pass@k: unbiased estimate from the n samples; distinct_correct: distinct correct "
        "responses per question.\n") + ("\nNotes:\n\n" + "".join(f"* {n}\n" for n in notes) if notes else "") + (
        f"\n![pass@k versus k]({plot})\n" if plot else "")
