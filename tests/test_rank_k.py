"""Rank-k diagnostics: metrics against a float64 reference (masking, accumulation, hidden-state
path, bf16) and the log -> PNG command line on synthetic verl console logs and file-logger JSON
lines."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from dyjr_verl.analysis.rank_k import RankKAccumulator, find_rank_k_keys, main, rank_k_metrics, rank_k_metrics_from_hidden
from dyjr_verl.analysis.steps import parse_log, read_steps


# many small block ops: see the one_intra_op_thread fixture in conftest.py
pytestmark = pytest.mark.usefixtures("one_intra_op_thread")


def reference(logits, mask, k, temperature=1.0):
    p = torch.softmax(logits.double() / temperature, -1)[mask]
    top = p.sort(-1, descending=True).values[:, :k]
    ent = -(p * torch.log(p.clamp(min=1e-300))).sum(-1)
    return top.mean(0), ent.mean(), int(mask.sum())


def test_metrics_match_float64_reference_with_mask():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 25, 3000, generator=gen) * 3
    mask = torch.rand(4, 25, generator=gen) > 0.4
    logits[~mask] = float("nan")  # never read
    m = rank_k_metrics(logits, mask, k=8, temperature=0.7)
    top, ent, n = reference(torch.nan_to_num(logits), mask, 8, 0.7)
    assert m["rank_k/tokens"] == n
    for i in range(8):
        assert m[f"rank_k/p{i + 1}"] == pytest.approx(float(top[i]), rel=1e-5, abs=1e-7)
    assert m["rank_k/top8_mass"] == pytest.approx(float(top.sum()), rel=1e-5)
    assert m["rank_k/entropy"] == pytest.approx(float(ent), rel=1e-5)
    ps = [m[f"rank_k/p{i + 1}"] for i in range(8)]
    assert ps == sorted(ps, reverse=True)


def test_accumulator_is_token_weighted_and_hidden_path_agrees():
    gen = torch.Generator().manual_seed(1)
    h1, h2 = torch.randn(3, 10, 16, generator=gen), torch.randn(5, 16, generator=gen)
    w = torch.randn(500, 16, generator=gen)
    m1 = torch.rand(3, 10, generator=gen) > 0.5
    acc = RankKAccumulator(4, prefix="val/rank_k/")
    acc.update(h1 @ w.T, m1)
    acc.update(h2 @ w.T)
    got = acc.compute()
    both = torch.cat([(h1 @ w.T)[m1], h2 @ w.T])
    top, ent, n = reference(both, torch.ones(both.shape[0], dtype=torch.bool), 4)
    assert got["val/rank_k/tokens"] == n
    assert got["val/rank_k/p2"] == pytest.approx(float(top[1]), rel=1e-5)
    assert got["val/rank_k/entropy"] == pytest.approx(float(ent), rel=1e-5)
    hid = rank_k_metrics_from_hidden(h1, w, m1, k=4)
    direct = rank_k_metrics(h1 @ w.T, m1, k=4)
    for key in direct:
        assert hid[key] == pytest.approx(direct[key], rel=1e-5)


def test_bf16_small_vocab_and_empty_mask():
    gen = torch.Generator().manual_seed(2)
    logits = (torch.randn(6, 5, generator=gen) * 2).to(torch.bfloat16)
    m = rank_k_metrics(logits, k=8)  # k > V: ranks up to V
    assert [k for k in m if k.startswith("rank_k/p")] == [f"rank_k/p{i}" for i in range(1, 6)]
    assert m["rank_k/top5_mass"] == pytest.approx(1.0, abs=1e-5)
    top, ent, _ = reference(logits.float(), torch.ones(6, dtype=torch.bool), 5)
    assert m["rank_k/p1"] == pytest.approx(float(top[0]), rel=1e-5)
    empty = rank_k_metrics(logits, torch.zeros(6, dtype=torch.bool), k=3)
    assert empty["rank_k/tokens"] == 0 and math.isnan(empty["rank_k/p1"]) and math.isnan(empty["rank_k/entropy"])


def _write_log(path: Path, collapse: float, steps=12, prefix="val/"):
    lines = ["some startup noise", "\x1b[36m(TaskRunner pid=1)\x1b[0m Training Progress: 0%"]
    for s in range(1, steps + 1):
        p1 = min(0.99, 0.5 + collapse * s)
        rest = [(1 - p1) * 0.6 ** i * 0.4 for i in range(1, 8)]
        items = [f"{prefix}rank_k/p1:{p1:.4f}"] + [f"{prefix}rank_k/p{i + 2}:{v:.5f}" for i, v in enumerate(rest)]
        items += [f"{prefix}rank_k/entropy:{2.0 * (1 - p1):.4f}", f"critic/score/mean:{0.1 * s:.3f}"]
        if s % 3 == 0:  # training-side metrics under another prefix on some steps
            items.append(f"actor/rank_k/p1:{p1:.4f}")
        lines.append(f"(TaskRunner pid=1) step:{s} - " + " - ".join(items))
    path.write_text("\n".join(lines) + "\n")


def test_cli_plots_several_runs(tmp_path, capsys):
    grpo, dyjr = tmp_path / "grpo.log", tmp_path / "dyjr.log"
    _write_log(grpo, collapse=0.04)
    _write_log(dyjr, collapse=0.01)
    out = tmp_path / "plots" / "rank_k.png"
    assert main([str(grpo), str(dyjr), "--out", str(out), "--labels", "GRPO", "DyJR", "--title", "synthetic"]) == 0
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
    assert "Rank-8 probability" in capsys.readouterr().out
    assert find_rank_k_keys(parse_log(grpo.read_text().splitlines())) == ("val/rank_k/", list(range(1, 9)))
    out2 = tmp_path / "subset.png"
    assert main([str(grpo), "--out", str(out2), "--prefix", "actor", "--ranks", "1", "--logy"]) == 0
    assert out2.stat().st_size > 0


def test_cli_errors(tmp_path, capsys):
    empty = tmp_path / "plain.log"
    empty.write_text("step:1 - critic/score/mean:0.5\n")
    assert main([str(empty), "--out", str(tmp_path / "x.png")]) == 2
    assert "rank_k" in capsys.readouterr().err
    assert main([str(tmp_path / "missing.log"), "--out", str(tmp_path / "x.png")]) == 2
    _write_log(tmp_path / "a.log", 0.01)
    assert main([str(tmp_path / "a.log"), "--out", str(tmp_path / "x.png"), "--labels", "a", "b"]) == 2
    assert main([str(tmp_path / "a.log"), "--out", str(tmp_path / "x.png"), "--prefix", "train"]) == 2
    assert not (tmp_path / "x.png").exists()


def test_metrics_round_trip_through_a_console_log(tmp_path):
    """Metrics computed by rank_k_metrics, logged the way verl prints them, plot back."""
    gen = torch.Generator().manual_seed(3)
    lines = []
    for step in range(1, 5):
        logits = torch.randn(2, 6, 200, generator=gen) * (1.0 + step)
        m = rank_k_metrics(logits, k=4, prefix="val/rank_k/")
        lines.append(f"step:{step} - " + " - ".join(f"{k}:{v}" for k, v in m.items()))
    log = tmp_path / "run.log"
    log.write_text("\n".join(lines) + "\n")
    steps = parse_log(log.read_text().splitlines())
    assert steps[4]["val/rank_k/p1"] > steps[1]["val/rank_k/p1"]  # sharper logits, larger Rank-1 mass
    assert main([str(log), "--out", str(tmp_path / "rt.png")]) == 0


def test_cli_reads_the_file_loggers_json_lines(tmp_path, capsys):
    """A run's metrics.jsonl, written by verl's own file logger, plots like its console log; a
    truncated one is one error line."""
    from unittest import mock

    from verl.utils.tracking import FileLogger

    console = tmp_path / "dyjr.log"
    _write_log(console, collapse=0.02)
    metrics = tmp_path / "dyjr" / "metrics.jsonl"
    metrics.parent.mkdir()
    with mock.patch.dict("os.environ", {"VERL_FILE_LOGGER_PATH": str(metrics)}):
        logger = FileLogger("dyjr_verl", "rank_k")
    for step, m in sorted(parse_log(console.read_text().splitlines()).items()):
        logger.log(m, step=step)
    logger.finish()
    assert read_steps(metrics) == parse_log(console.read_text().splitlines())
    out = tmp_path / "from_jsonl.png"
    assert main([str(metrics), str(console), "--labels", "jsonl", "console", "--out", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with metrics.open("a") as f:
        f.write('{"step":13,"da')
    capsys.readouterr()
    assert main([str(metrics), "--out", str(tmp_path / "bad.png")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "metrics.jsonl:13: not a JSON line" in err and not (tmp_path / "bad.png").exists()


def test_plot_step_ticks_are_integers(tmp_path, monkeypatch):
    """A short run (steps 1..3) still gets whole-step ticks, not 1.5 / 2.5 (issue 16, item 5). The
    real plot is drawn; savefig is only wrapped to keep the figure for inspection."""
    from matplotlib.figure import Figure

    from dyjr_verl.analysis.rank_k import plot_rank_k

    saved = []
    real_savefig = Figure.savefig

    def keep(fig, *args, **kwargs):
        saved.append(fig)
        return real_savefig(fig, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", keep)
    log = tmp_path / "short.log"
    _write_log(log, collapse=0.05, steps=3)
    out = tmp_path / "short.png"
    plot_rank_k({"short": parse_log(log.read_text().splitlines())}, out)
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
    (fig,) = saved
    drawn = [ax for ax in fig.axes if ax.get_lines()]
    assert len(drawn) == 9  # Rank-1..8 and the entropy
    for ax in drawn:
        lo, hi = ax.get_xlim()
        ticks = [t for t in ax.get_xticks() if lo <= t <= hi]
        assert len(ticks) >= 2 and all(float(t).is_integer() for t in ticks), ticks
        labels = [t.get_text() for t in ax.get_xticklabels() if lo <= t.get_position()[0] <= hi]
        assert labels and all(lab.lstrip("−-").isdigit() for lab in labels), labels
