"""Report of the miniature reproduction (issue 7): a table per method and plots over steps.

    python -m dyjr_verl.analysis.report [--runs results/mini/runs] [--ablation results/mini/ablation] \\
        [--out results/mini] [--smooth 5]

Reads the run records that ``python -m dyjr_verl.experiments.mini`` writes (``<label>/seed<s>/run.json``)
and writes ``<out>/README.md`` with

* the table per method, mean ± sample std over seeds: held-out greedy accuracy, avg@8, pass@1/8/32,
  mean Rank-1 probability and entropy of the final policy on its own sampled test responses,
  distinct correct answers per question, steady step time, total wall time (start-up and RLEP's
  collection included);
* a factual comparison: DyJR minus each other method per metric, against the seed spread;
* ``accuracy_over_steps.png`` (training reward per step) and ``rank1_over_steps.png`` (per-step
  ``rank_k/p1`` and ``rank_k/entropy`` when the runs logged them): one line per method, mean over
  seeds, shaded ± one std;
* the DyJR ablation (validation slice of train) when ``--ablation`` holds runs;
* a "Reading" section left for a person to write.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dyjr_verl.analysis.steps import METRICS_FILE
from dyjr_verl.experiments.config import LABELS, METHODS
from dyjr_verl.experiments.records import load_runs

SCORE_KEY = "critic/score/mean"
RANK1_KEY = "rank_k/p1"
ENTROPY_KEY = "rank_k/entropy"


@dataclass(frozen=True)
class Column:
    title: str
    get: Callable[[dict[str, Any]], float | None]
    fmt: Callable[[float], str]
    percent: bool = False  # values in [0, 1] shown as %


def _eval(key: str) -> Callable[[dict[str, Any]], float | None]:
    return lambda r: r.get("eval", {}).get(key)


def _timing(key: str) -> Callable[[dict[str, Any]], float | None]:
    return lambda r: r.get("timing", {}).get(key)


def _pct(v: float) -> str:
    return f"{100 * v:.1f}"


COLUMNS: tuple[Column, ...] = (
    Column("greedy %", _eval("greedy"), _pct, True),
    Column("avg@8 %", _eval("avg@8"), _pct, True),
    Column("pass@1 %", _eval("pass@1"), _pct, True),
    Column("pass@8 %", _eval("pass@8"), _pct, True),
    Column("pass@32 %", _eval("pass@32"), _pct, True),
    Column("Rank-1 prob", _eval("rank_k/p1"), lambda v: f"{v:.3f}"),
    Column("entropy (nats)", _eval("rank_k/entropy"), lambda v: f"{v:.3f}"),
    Column("distinct correct / question", _eval("distinct_correct"), lambda v: f"{v:.2f}"),
    Column("steady step (s)", _timing("steady_step_s"), lambda v: f"{v:.2f}"),
    Column("total wall (s)", _timing("total_wall_s"), lambda v: f"{v:.0f}"),
)


@dataclass
class Stat:
    mean: float
    std: float | None  # sample std (n - 1); None with one seed
    n: int


def stat(values: Sequence[float | None]) -> Stat | None:
    vals = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    if not vals:
        return None
    return Stat(statistics.fmean(vals), statistics.stdev(vals) if len(vals) > 1 else None, len(vals))


def fmt_stat(s: Stat | None, fmt: Callable[[float], str]) -> str:
    if s is None:
        return "–"
    return fmt(s.mean) if s.std is None else f"{fmt(s.mean)} ± {fmt(s.std)}"


def group_runs(runs: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """label -> its runs (seeds), methods in the canonical order first."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for r in runs:
        groups.setdefault(r["label"], []).append(r)
    order = [m for m in METHODS if m in groups] + sorted(k for k in groups if k not in METHODS)
    return {k: sorted(groups[k], key=lambda r: r["seed"]) for k in order}


def label_of(key: str, labels: dict[str, str] | None = None) -> str:
    """How a report names a run label (``labels``: an experiment's own names, over the miniature's)."""
    return {**LABELS, **(labels or {})}.get(key, key)


def method_table(groups: dict[str, list[dict[str, Any]]], columns: Sequence[Column] = COLUMNS,
                 labels: dict[str, str] | None = None) -> tuple[str, dict]:
    """Markdown table (one row per method) and the stats behind it: ``stats[label][column title]``."""
    stats: dict[str, dict[str, Stat | None]] = {}
    head = "| method | seeds | " + " | ".join(c.title for c in columns) + " |"
    lines = [head, "|---" * (len(columns) + 2) + "|"]
    for label, runs in groups.items():
        stats[label] = {c.title: stat([c.get(r) for r in runs]) for c in columns}
        cells = [fmt_stat(stats[label][c.title], c.fmt) for c in columns]
        lines.append(f"| {label_of(label, labels)} | {len(runs)} | " + " | ".join(cells) + " |")
    return "\n".join(lines), stats


def comparison(stats: dict[str, dict[str, Stat | None]], columns: Sequence[Column] = COLUMNS, ref: str = "dyjr",
               base: str = "grpo", labels: dict[str, str] | None = None) -> str:
    """``ref`` (DyJR) minus every other method per metric, against the seed spread (factual, no verdict)."""
    def name(key: str) -> str:
        return label_of(key, labels)

    if ref not in stats or len(stats) < 2:
        return f"_No comparison: the runs hold no {name(ref)} results or nothing to compare it with._"
    out = []
    others = [k for k in stats if k != ref]
    head = "| metric | " + " | ".join(f"{name(ref)} − {name(o)}" for o in others) + " |"
    out += [head, "|---" * (len(others) + 1) + "|"]
    summary: dict[str, list[str]] = {"above": [], "below": [], "within": []}
    for c in columns:
        cells = []
        for o in others:
            a, b = stats[ref].get(c.title), stats[o].get(c.title)
            if a is None or b is None:
                cells.append("–")
                continue
            diff = a.mean - b.mean
            spread = max((s for s in (a.std, b.std) if s is not None), default=None)
            scale = 100.0 if c.percent else 1.0
            unit = " pts" if c.percent else ""
            ratio = f" ({abs(diff) / spread:.1f}× seed std)" if spread else ""
            cells.append(f"{diff * scale:+.3g}{unit}{ratio}")
            if o == base and spread:
                key = "within" if abs(diff) <= spread else ("above" if diff > 0 else "below")
                summary[key].append(c.title)
        out.append(f"| {c.title} | " + " | ".join(cells) + " |")
    text = "\n".join(out)
    if base in stats:
        n_ref, n_base = (max((s.n for s in stats[k].values() if s), default=0) for k in (ref, base))
        parts = []
        if summary["above"]:
            parts.append(f"higher than {name(base)} by more than the larger seed std on " + ", ".join(summary["above"]))
        if summary["below"]:
            parts.append(f"lower than {name(base)} by more than the larger seed std on " + ", ".join(summary["below"]))
        if summary["within"]:
            parts.append(f"within one seed std of {name(base)} on " + ", ".join(summary["within"]))
        sentence = ("; ".join(parts) + ".") if parts else "no metric has a seed spread to compare with (one seed)."
        text = (f"{name(ref)} ({_seeds(n_ref)}) vs {name(base)} ({_seeds(n_base)}): " + sentence +
                " Seed std is the sample standard deviation over seeds; with a handful of seeds it is itself "
                "uncertain, so a difference of about one std is not evidence either way."
                + (" Step and wall times: lower is cheaper." if any("(s)" in c.title for c in columns) else "")
                + " Rank-1 probability: lower means more probability off the top token.\n\n" + text)
    return text


def _seeds(n: int) -> str:
    return f"{n} seed" + ("s" if n != 1 else "")


def series(runs: list[dict[str, Any]], key: str, smooth: int = 1) -> tuple[list[int], list[float], list[float]] | None:
    """Per step: mean and std over the runs' (optionally moving-averaged) ``key``; steps every run logged."""
    per_run = []
    for r in runs:
        pts = {int(s): m[key] for s, m in r.get("steps", {}).items() if key in m and math.isfinite(m[key])}
        if pts:
            steps = sorted(pts)
            vals = [pts[s] for s in steps]
            if smooth > 1:  # trailing moving average: the per-step reward of 32 rollouts is noisy
                vals = [statistics.fmean(vals[max(0, i - smooth + 1): i + 1]) for i in range(len(vals))]
            per_run.append(dict(zip(steps, vals)))
    if not per_run:
        return None
    common = sorted(set.intersection(*(set(p) for p in per_run)))
    if not common:
        return None
    means = [statistics.fmean(p[s] for p in per_run) for s in common]
    stds = [statistics.stdev([p[s] for p in per_run]) if len(per_run) > 1 else 0.0 for s in common]
    return common, means, stds


def band(ax: Any, xs: Sequence[float], mean: Sequence[float], sd: Sequence[float], label: str, color: Any = None) -> Any:
    """A mean line with a +- sd band in the line's colour (seeds' spread in every report plot)."""
    line, = ax.plot(xs, mean, color=color, lw=1.6, label=label)
    ax.fill_between(xs, [m - d for m, d in zip(mean, sd)], [m + d for m, d in zip(mean, sd)],
                    color=line.get_color(), alpha=0.18, lw=0)
    return line


def save_figure(fig: Any, out: Path) -> None:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)


def plot_over_steps(groups: dict[str, list[dict[str, Any]]], panels: Sequence[tuple], out: Path,
                    smooth: int = 1, labels: dict[str, str] | None = None) -> list[str]:
    """One panel per (metric key, title[, smoothing]), one line per method (mean over seeds, ± std
    band); a panel without its own smoothing takes ``smooth``. Returns the titles of the panels that
    had data; writes nothing when none had."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    specs = [(p[0], p[1], p[2] if len(p) > 2 else smooth) for p in panels]
    data = {key: {label: series(runs, key, sm) for label, runs in groups.items()} for key, _, sm in specs}
    shown = [(k, t, sm) for k, t, sm in specs if any(v is not None for v in data[k].values())]
    if not shown:
        return []
    fig, axes = plt.subplots(1, len(shown), figsize=(5.2 * len(shown), 3.6), squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, (key, title, sm) in zip(axes[0], shown):
        for i, label in enumerate(groups):
            s = data[key][label]
            if s is None:
                continue
            xs, mean, std = s
            color = colors[i % len(colors)]
            n = len(groups[label])
            band(ax, xs, mean, std, f"{label_of(label, labels)} (n={n})", color=color)
        ax.set_title(title + (f" ({sm}-step moving avg)" if sm > 1 else ""), fontsize=10)
        ax.set_xlabel("training step")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # steps are whole numbers
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    save_figure(fig, out)
    return [t for _, t, _ in shown]


def _warmstart_section(runs: list[dict[str, Any]]) -> str:
    ws = next((r["warmstart"] for r in runs if r.get("warmstart")), None)
    if not ws:
        return "_No warm-start record in the runs._"
    val, test = ws.get("val", {}), ws.get("test", {})
    k = test.get("k", 8)
    task = _task(runs)
    flag = "" if task == "arith" else f" --task {task}"
    return (f"`python -m dyjr_verl.assets warmstart{flag}` (key `{ws.get('key', '?')}`): {ws.get('steps', '?')} supervised "
            f"steps, stopped by the rule on the validation slice (greedy {100 * val.get('greedy', float('nan')):.1f}% "
            f"on {val.get('questions', '?')} questions). Held-out test, measured once after the choice (HF generate, "
            f"T = 1): greedy {100 * test.get('greedy', float('nan')):.1f}%, avg@{k} "
            f"{100 * test.get('avg_at_k', float('nan')):.1f}%, pass@{k} {100 * test.get('pass_at_k', float('nan')):.1f}% "
            f"({test.get('questions', '?')} questions).")


TASK_TITLES = {"arith": "embedded arithmetic", "sql": "embedded Text-to-SQL"}


def _task(runs: list[dict[str, Any]]) -> str:
    return runs[0].get("task", "arith")  # records from before the SQL task carry no task


def _setup_section(runs: list[dict[str, Any]]) -> str:
    r0 = runs[0]
    shared = r0.get("shared", {})
    ev = r0.get("eval_settings", {})
    t = [r["timing"] for r in runs if r.get("timing")]
    startup = stat([x.get("startup_s") for x in t])
    evalw = stat([x.get("eval_wall_s") for x in t])
    collect = stat([r["timing"].get("collect_s") for r in runs if r["method"] == "rlep"])
    lines = [
        (f"- {shared.get('steps', '?')} training steps per run, 8 prompts × 4 rollouts per step (the `*_tiny_cpu` "
        f"recipes' shared `_tiny_arith.yaml`), max response {shared.get('max_response_length', '?')} tokens; every "
        "method starts from the same warm start and gets the same shared overrides and seed overrides "
        "(data shuffle, vLLM sampling, actor data-loader and engine seeds, the method's replay seed)."),
        (f"- Evaluation on the `{ev.get('split', '?')}` split: greedy + {ev.get('samples', '?')} samples at "
        f"T = {ev.get('temperature', '?')} per question (vLLM); avg@8 = mean accuracy of the first 8 samples, "
        "pass@k unbiased from all samples; Rank-1 probability and entropy = token-weighted means of the final "
        "policy's next-token distribution over its own sampled responses (one HF forward)."),
        ("- Steady step: mean verl `timing_s/step` without step 1 and the last step (it saves the checkpoint). "
        "Total wall: trainer launch to exit (Ray/vLLM/FSDP start-up, every step, checkpoint) plus, for RLEP, its "
        "pool collection (once per seed, on the warm-start model, counted in that seed's RLEP run). Evaluation "
        "time is not part of a method's cost."),
    ]
    task_overrides = [o for o in r0.get("command", []) if o.startswith(("data.train_files=", "reward."))]
    if task_overrides:  # the task's data and reward, identical for every method
        lines.append("- Task overrides (same for every method): " + ", ".join(f"`{o}`" for o in task_overrides) + ".")
    if startup:
        lines.append(f"- Measured start-up (launch to step 1, without step 1): {startup.mean:.0f} s mean over "
                     f"{startup.n} run(s); evaluation {evalw.mean:.0f} s per run" + (
                         f"; RLEP collection {collect.mean:.0f} s per seed" if collect else "") + ".")
    return "\n".join(lines)


def _steps_source(runs: list[dict[str, Any]]) -> str:
    """Where the records' per-step metrics came from (records without ``steps_source`` predate the file logger)."""
    n_file = sum(r.get("steps_source") == METRICS_FILE for r in runs)
    if n_file == len(runs):
        return f"Per-step metrics from verl's file logger (`{METRICS_FILE}`)."
    if not n_file:
        return "Per-step metrics parsed from verl's console log (records made before the file logger)."
    return (f"Per-step metrics from verl's file logger (`{METRICS_FILE}`) for {n_file} runs, parsed from the "
            f"console log for {len(runs) - n_file} older runs.")


def _ablation_section(runs: list[dict[str, Any]]) -> str:
    groups = group_runs(runs)
    cols = [c for c in COLUMNS if c.title not in ("total wall (s)",)]
    table, stats = method_table(groups, cols)
    split = runs[0].get("eval_settings", {}).get("split", "val")
    overrides = "\n".join(f"- `{label}`: " + (", ".join(f"`{o}`" for o in rs[0].get("extra_overrides", [])) or
                                              f"recipe defaults of `{rs[0]['recipe']}`") for label, rs in groups.items())
    lines = [(f"One seed each, evaluated on the `{split}` split (a validation slice cut from the training questions "
             "and never trained on), so choosing DyJR settings never looks at the test split."), "", overrides, "",
             table]
    if "dyjr" in stats:
        base = stats["dyjr"]
        diffs = []
        for label in stats:
            if label == "dyjr":
                continue
            cells = []
            for c in cols[:5]:
                a, b = stats[label].get(c.title), base.get(c.title)
                cells.append("–" if a is None or b is None else f"{100 * (a.mean - b.mean):+.1f}")
            diffs.append(f"| {label} | " + " | ".join(cells) + " |")
        lines += ["", ("Difference to the DyJR default (percentage points; one seed, so compare with the seed std "
                      "of the main table):"), "", "| variant | " + " | ".join(c.title for c in cols[:5]) + " |",
                  "|---" * 6 + "|", *diffs]
    return "\n".join(lines)


def write_report(runs_dir: Path, out: Path, ablation_dir: Path | None = None, smooth: int = 5) -> Path:
    runs = [r for r in load_runs(runs_dir) if r.get("status") == "done"]
    if not runs:
        raise FileNotFoundError(f"no finished run (<label>/seed<s>/run.json) under {runs_dir}")
    groups = group_runs(runs)
    out.mkdir(parents=True, exist_ok=True)
    table, stats = method_table(groups)
    acc_png, rank_png = out / "accuracy_over_steps.png", out / "rank1_over_steps.png"
    acc_panels = plot_over_steps(groups, [(SCORE_KEY, "training reward (mean score of the step's rollouts)")],
                                 acc_png, smooth)
    rank_panels = plot_over_steps(groups, [(RANK1_KEY, "Rank-1 probability (rollouts)"),
                                           (ENTROPY_KEY, "entropy (nats, rollouts)")], rank_png, smooth)
    for png, panels in ((acc_png, acc_panels), (rank_png, rank_panels)):
        if not panels and png.exists():
            png.unlink()  # a stale plot from an earlier report must not survive

    task = _task(runs)
    parts = [
        f"# Miniature reproduction: GRPO vs DyJR vs RLEP vs Ex-GRPO (tiny model, {TASK_TITLES.get(task, task)}, CPU)",
        "",
        ("_Generated by `python -m dyjr_verl.analysis.report` from the run records of "
        "`python -m dyjr_verl.experiments.mini run`; see docs/mini.md. Do not edit by hand except the Reading "
        "section._"),
        "",
        "## Set-up",
        "",
        _warmstart_section(runs),
        "",
        _setup_section(runs),
        "",
        "## Results (held-out test split, mean ± std over seeds)",
        "",
        table,
        "",
        "## DyJR compared with the others (factual)",
        "",
        comparison(stats),
        "",
        "## Over training steps",
        "",
    ]
    if acc_panels:
        parts += [f"![training reward]({acc_png.name})", ""]
    else:
        parts += [f"_No `{SCORE_KEY}` in the run records._", ""]
    if rank_panels:
        parts += [f"![Rank-1 probability]({rank_png.name})", ""]
    else:
        parts += [(f"_The runs logged no per-step `{RANK1_KEY}` (the trainer's Rank-k probe was off): only the "
                  "evaluation-time Rank-1 probability of the table is available._"), ""]
    parts += [("Mean over seeds, shaded ± one sample std; the training reward is the mean verifier score of the "
              "step's 32 fresh rollouts (T = 1), not held-out accuracy. " + _steps_source(runs)), ""]
    abl = load_runs(ablation_dir) if ablation_dir and ablation_dir.is_dir() else []
    abl = [r for r in abl if r.get("status") == "done"]
    if abl:
        parts += ["## DyJR ablation (validation slice)", "", _ablation_section(abl), ""]
    readme = out / "README.md"
    parts += ["## Reading", "", _kept_reading(readme) or (
        "_To be written: where DyJR wins, where it does not, by how much compared with the "
        "seed spread, and which DyJR settings matter._"), ""]
    readme.write_text("\n".join(parts))
    return readme


def _kept_reading(readme: Path) -> str:
    """The hand-written Reading section of an earlier report (regenerating must not erase it)."""
    if not readme.is_file():
        return ""
    text = readme.read_text()
    marker = "\n## Reading\n"
    if marker not in text:
        return ""
    kept = text.split(marker, 1)[1].strip()
    return "" if kept.startswith("_To be written") else kept


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dyjr_verl.analysis.report", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=Path, default=Path("results/mini/runs"))
    parser.add_argument("--ablation", type=Path, default=None,
                        help="ablation runs (default: <runs>/../ablation when it exists)")
    parser.add_argument("--out", type=Path, default=Path("results/mini"))
    parser.add_argument("--smooth", type=int, default=5, help="moving-average window of the per-step curves (1 = raw)")
    args = parser.parse_args(argv)
    if args.smooth < 1:
        print(f"error: --smooth must be >= 1, got {args.smooth}", file=sys.stderr)
        return 2
    if not args.runs.is_dir():
        print(f"error: --runs {args.runs}: no such directory (run `python -m dyjr_verl.experiments.mini run` first)",
              file=sys.stderr)
        return 2
    ablation = args.ablation if args.ablation is not None else args.runs.parent / "ablation"
    try:
        readme = write_report(args.runs, args.out, ablation, args.smooth)
    except FileNotFoundError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"written: {readme} (+ plots in {args.out})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
