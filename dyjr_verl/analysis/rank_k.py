"""Rank-k token-probability diagnostics (method notes, section 7) and their plot.

At every generated (masked) position, the policy's next-token distribution sorted in descending
order gives p(1) >= p(2) >= ... >= p(k); averaged over positions (token-weighted) and logged per
step, these show collapse (GRPO: p(1) -> 1, p(2..k) -> 0) versus kept diversity. The mean entropy is
reported alongside. Computed with the chunked kernel (:func:`dyjr_verl.kernels.topk_log_softmax`,
running top-r merge + entropy in one pass over the vocabulary; no ``[N, V]`` fp32 copy), from
logits or from hidden states x LM head.

Metrics (``prefix`` default ``rank_k/``): ``p1`` .. ``p{k}``, ``top{k}_mass`` (their sum),
``entropy``, ``tokens`` (positions averaged). Log them from a validation / eval hook (e.g. under
``val/``); the CLI reads them back from each run's ``metrics.jsonl`` (verl's file logger; a console
log of an older run works too, :func:`dyjr_verl.analysis.steps.read_steps`)::

    python -m dyjr_verl.analysis.rank_k grpo/metrics.jsonl dyjr/metrics.jsonl --out rank_k.png [--labels GRPO DyJR]

draws one panel per rank (Rank-1 .. Rank-k) and one for the entropy, one line per run, against the
training step. Keys are matched as ``<anything>rank_k/p<i>``; with several prefixes in one log
(``val/rank_k/p1`` and ``actor/rank_k/p1``) pick one with ``--prefix``.
"""

from __future__ import annotations

import argparse
import math
import re
import sys
from collections import Counter
from pathlib import Path
from typing import Optional, Sequence

import torch

__all__ = [
    "DEFAULT_PREFIX",
    "RankKAccumulator",
    "rank_k_metrics",
    "rank_k_metrics_from_hidden",
    "find_rank_k_keys",
    "plot_rank_k",
    "main",
]

DEFAULT_PREFIX = "rank_k/"
_KEY = re.compile(r"^(?P<pre>.*?)rank_k/p(?P<rank>\d+)$")


# ----------------------------------------------------------------------------------------------
# metrics
# ----------------------------------------------------------------------------------------------


class RankKAccumulator:
    """Token-weighted running sums of the Rank-1..k probabilities and the entropy over many
    batches (float64); :meth:`compute` returns the metrics dict."""

    def __init__(self, k: int = 8, *, temperature: float = 1.0, prefix: str = DEFAULT_PREFIX, backend: str = "auto"):
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        self.k = int(k)
        self.temperature = float(temperature)
        self.prefix = prefix
        self.backend = backend
        self.reset()

    def reset(self) -> None:
        self.sum_p = torch.zeros(self.k, dtype=torch.float64)
        self.sum_entropy = 0.0
        self.tokens = 0
        self.k_eff = self.k

    @staticmethod
    def _rows(mask: Optional[torch.Tensor], lead: tuple, device) -> Optional[torch.Tensor]:
        if mask is None:
            return None
        if tuple(mask.shape) != lead:
            raise ValueError(f"mask {tuple(mask.shape)} must have the leading shape {lead} of the logits")
        return torch.nonzero(mask.reshape(-1).to(device).bool(), as_tuple=False).reshape(-1)

    def _add(self, out) -> None:
        top = out.top_probs.detach().double().cpu()
        n = top.shape[0]
        if n == 0:
            return
        self.k_eff = min(self.k_eff, top.shape[1])
        self.sum_p[: top.shape[1]] += top.sum(dim=0)
        self.sum_entropy += float(out.entropy.detach().double().sum())
        self.tokens += n

    @torch.no_grad()
    def update(self, logits: torch.Tensor, mask: Optional[torch.Tensor] = None) -> None:
        """Add the positions of ``logits`` ``[..., V]`` where ``mask`` ``[...]`` is True."""
        from dyjr_verl.kernels import topk_log_softmax

        lead = tuple(logits.shape[:-1])
        vocab = logits.shape[-1]
        rows = self._rows(mask, lead, logits.device)
        out = topk_log_softmax(
            logits.reshape(-1, vocab), temperature=self.temperature, rows=rows, entropy=True, top_r=self.k, backend=self.backend
        )
        if rows is None:
            out = out._replace(top_probs=out.top_probs.reshape(-1, out.top_probs.shape[-1]), entropy=out.entropy.reshape(-1))
        self._add(out)

    @torch.no_grad()
    def update_from_hidden(self, hidden: torch.Tensor, weight: torch.Tensor, mask: Optional[torch.Tensor] = None) -> None:
        """As :meth:`update` with ``logits = hidden @ weight.T`` formed chunk by chunk."""
        from dyjr_verl.kernels import topk_log_softmax_from_hidden

        lead = tuple(hidden.shape[:-1])
        rows = self._rows(mask, lead, hidden.device)
        out = topk_log_softmax_from_hidden(
            hidden.reshape(-1, hidden.shape[-1]), weight, temperature=self.temperature, rows=rows, entropy=True, top_r=self.k
        )
        if rows is None:
            out = out._replace(top_probs=out.top_probs.reshape(-1, out.top_probs.shape[-1]), entropy=out.entropy.reshape(-1))
        self._add(out)

    def compute(self) -> dict[str, float]:
        n = max(self.tokens, 1)
        k = self.k_eff
        mean_p = (self.sum_p[:k] / n).tolist() if self.tokens else [float("nan")] * k
        metrics = {f"{self.prefix}p{i + 1}": float(v) for i, v in enumerate(mean_p)}
        metrics[f"{self.prefix}top{k}_mass"] = float(sum(mean_p))
        metrics[f"{self.prefix}entropy"] = self.sum_entropy / n if self.tokens else float("nan")
        metrics[f"{self.prefix}tokens"] = float(self.tokens)
        return metrics


def rank_k_metrics(
    logits: torch.Tensor,
    mask: Optional[torch.Tensor] = None,
    *,
    k: int = 8,
    temperature: float = 1.0,
    prefix: str = DEFAULT_PREFIX,
    backend: str = "auto",
) -> dict[str, float]:
    """Mean Rank-1..k probabilities and mean entropy of ``softmax(logits / temperature)`` over the
    positions where ``mask`` is True (all positions without a mask). ``logits``: ``[..., V]``;
    ``mask``: ``[...]`` (e.g. verl's ``response_mask``). Returns ``{prefix}p1..p{k}``,
    ``{prefix}top{k}_mass``, ``{prefix}entropy``, ``{prefix}tokens``; NaN values when no position
    is selected."""
    acc = RankKAccumulator(k, temperature=temperature, prefix=prefix, backend=backend)
    acc.update(logits, mask)
    return acc.compute()


def rank_k_metrics_from_hidden(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    mask: Optional[torch.Tensor] = None,
    *,
    k: int = 8,
    temperature: float = 1.0,
    prefix: str = DEFAULT_PREFIX,
) -> dict[str, float]:
    """:func:`rank_k_metrics` from hidden states ``[..., H]`` and an LM head ``[V, H]``."""
    acc = RankKAccumulator(k, temperature=temperature, prefix=prefix)
    acc.update_from_hidden(hidden, weight, mask)
    return acc.compute()


# ----------------------------------------------------------------------------------------------
# logs -> plot
# ----------------------------------------------------------------------------------------------


def find_rank_k_keys(steps: dict[int, dict[str, float]], prefix: Optional[str] = None) -> tuple[str, list[int]]:
    """(metric prefix including ``rank_k/``, sorted ranks present) in a parsed log. Without
    ``prefix``, the prefix with the most Rank-k keys wins (ties: alphabetical)."""
    found: dict[str, set[int]] = {}
    for metrics in steps.values():
        for key in metrics:
            m = _KEY.match(key)
            if m:
                found.setdefault(m.group("pre") + "rank_k/", set()).add(int(m.group("rank")))
    if prefix is not None:
        if prefix.endswith("rank_k/"):
            want = prefix
        elif prefix.strip("/"):
            want = prefix.rstrip("/") + "/rank_k/"
        else:
            want = "rank_k/"
        if want not in found:
            raise KeyError(f"no '{want}p<i>' metrics (found prefixes: {sorted(found) or 'none'})")
        return want, sorted(found[want])
    if not found:
        raise KeyError("no '<prefix>rank_k/p<i>' metrics in the log")
    counts = Counter({pre: len(r) for pre, r in found.items()})
    best = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[0][0]
    return best, sorted(found[best])


def plot_rank_k(
    runs: dict[str, dict[int, dict[str, float]]],
    out: Path,
    *,
    prefix: Optional[str] = None,
    ranks: Optional[Sequence[int]] = None,
    title: Optional[str] = None,
    logy: bool = False,
) -> list[str]:
    """Draw Rank-i probability (and entropy) over steps, one line per run, into ``out`` (PNG).
    Returns the panel titles. Raises KeyError when no run has Rank-k metrics."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    keyed: dict[str, tuple[str, list[int]]] = {}
    problems = []
    for label, steps in runs.items():
        try:
            keyed[label] = find_rank_k_keys(steps, prefix)
        except KeyError as exc:
            problems.append(f"{label}: {exc.args[0]}")
    if not keyed:
        raise KeyError("; ".join(problems) or "no runs")
    all_ranks = sorted(set().union(*(set(r) for _, r in keyed.values())))
    show = [r for r in (ranks or all_ranks) if r in all_ranks]
    if not show:
        raise KeyError(f"none of the ranks {list(ranks or [])} is logged (logged: {all_ranks})")
    has_entropy = any(any(f"{pre}entropy" in m for m in runs[label].values()) for label, (pre, _) in keyed.items())
    panels = [f"Rank-{r} probability" for r in show] + (["entropy (nats)"] if has_entropy else [])
    ncols = min(4, len(panels))
    nrows = math.ceil(len(panels) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.0 * ncols, 3.0 * nrows), squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for idx, (label, (pre, _)) in enumerate(keyed.items()):
        steps = runs[label]
        color = colors[idx % len(colors)]
        keys = [f"{pre}p{r}" for r in show] + ([f"{pre}entropy"] if has_entropy else [])
        for pidx, key in enumerate(keys):
            xs = [s for s in sorted(steps) if key in steps[s] and math.isfinite(steps[s][key])]
            ax = axes[pidx // ncols][pidx % ncols]
            if xs:
                ax.plot(xs, [steps[s][key] for s in xs], marker="o" if len(xs) < 30 else None, ms=3, lw=1.5, color=color, label=label)
    for pidx, name in enumerate(panels):
        ax = axes[pidx // ncols][pidx % ncols]
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("step")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # steps are whole: no 1.5 ticks on short runs
        ax.grid(alpha=0.3)
        if logy and name.startswith("Rank-"):
            ax.set_yscale("log")
    for pidx in range(len(panels), nrows * ncols):
        axes[pidx // ncols][pidx % ncols].axis("off")
    axes[0][0].legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    for p in problems:
        print(f"warning: {p}", file=sys.stderr)
    return panels


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m dyjr_verl.analysis.rank_k",
        description="Plot Rank-1..k token probabilities and entropy over steps from verl runs' metrics.",
    )
    parser.add_argument("logs", nargs="+", type=Path,
                        help="each run's metrics.jsonl (verl's file logger) or, for old runs, its console log")
    parser.add_argument("--out", type=Path, required=True, help="output PNG")
    parser.add_argument("--labels", nargs="+", help="one label per log (default: the file names)")
    parser.add_argument("--prefix", help="metric prefix, e.g. 'val' for val/rank_k/p1 (default: the most complete)")
    parser.add_argument("--ranks", nargs="+", type=int, help="ranks to draw (default: all logged)")
    parser.add_argument("--title")
    parser.add_argument("--logy", action="store_true", help="log scale for the probability panels")
    args = parser.parse_args(argv)

    from dyjr_verl.analysis.steps import StepsError, read_steps

    if args.labels and len(args.labels) != len(args.logs):
        print(f"error: {len(args.labels)} labels for {len(args.logs)} logs", file=sys.stderr)
        return 2
    labels = args.labels or [p.stem for p in args.logs]
    if len(set(labels)) != len(labels):
        labels = [str(p) for p in args.logs]
    runs = {}
    for label, path in zip(labels, args.logs):
        try:
            runs[label] = read_steps(path)  # JSON lines or console text, told apart by content
        except StepsError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
    try:
        panels = plot_rank_k(runs, args.out, prefix=args.prefix, ranks=args.ranks, title=args.title, logy=args.logy)
    except KeyError as exc:
        print(f"error: {exc.args[0]}", file=sys.stderr)
        return 2
    print(f"wrote {args.out} ({len(runs)} runs; panels: {', '.join(panels)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
