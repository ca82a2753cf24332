"""The pass@k-versus-k plot of an evaluation (``pass_at_k.png`` next to ``results.md``).

One line per benchmark, k on a log2 axis from 1 to n: a policy that keeps several ways to the answer
keeps climbing with k, a collapsed one is flat after k = 1 (the diversity claim is read here). Drawn
on a bare :class:`matplotlib.figure.Figure` (Agg canvas): no pyplot state, no backend switch for a
caller that has one.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["pass_at_k_figure", "write_pass_at_k_plot"]


def pass_at_k_figure(curves: dict[str, dict[int, float]], title: str | None = None):
    """``curves[benchmark][k]`` = pass@k in [0, 1] (:func:`dyjr_verl.eval.metrics.pass_at_k_curves`)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import FixedLocator, NullLocator

    fig = Figure(figsize=(5.6, 3.8))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for bench, curve in curves.items():
        ks = sorted(curve)
        ax.plot(ks, [100 * curve[k] for k in ks], marker="o", ms=3, lw=1.6, label=f"{bench} (n={ks[-1]})")
    ks = sorted({k for curve in curves.values() for k in curve})
    ax.set_xscale("log", base=2)
    # integer k at the measured points only (log2 minor ticks would label 3, 5, 6, ...)
    ax.xaxis.set_major_locator(FixedLocator(ks))
    ax.xaxis.set_minor_locator(NullLocator())
    ax.set_xticklabels([str(k) for k in ks])
    ax.set_xlim(1, max(2, ks[-1]))
    ax.set_ylim(0, 100)
    ax.set_xlabel("k (samples drawn)")
    ax.set_ylabel("pass@k (%)")
    ax.set_title(title or "pass@k versus k (unbiased, from n samples per question)", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def write_pass_at_k_plot(curves: dict[str, dict[int, float]], out: Path) -> None:
    """Write the plot to ``out`` (PNG)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    pass_at_k_figure(curves).savefig(out, dpi=110)
