"""RLEP's released experience pool (DAPO-style parquet with ``reward_model.candidates``) -> our pool
file, loaded back with the trainer's own loader and keyed like the training rows the trainer sees."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from dyjr_verl.methods.rlep.importer import main
from dyjr_verl.data import math as dm
from dyjr_verl.replay.questions import question_key

TEMPLATE = "Solve step by step. End with a line 'Answer: $Answer'.\n\n{}\n\nRemember the Answer: line."
# question, gold, candidates per row; q0 and q1 appear twice (q1 with a second, different list)
RELEASED = [
    ("What is 17 + 17?", "34", ["17+17 = 34\nAnswer: 34", "Double 17.\nAnswer: 34", "Answer: 35"]),
    ("Compute 3^4.", "81", ["3^4 = 81\nAnswer: 81", "3^4 = 81\nAnswer: 81"]),
    ("What is 17 + 17?", "34", ["17+17 = 34\nAnswer: 34", "Double 17.\nAnswer: 34", "Answer: 35"]),
    ("How many primes are below 10?", "4", ["2, 3, 5, 7\nAnswer: 4"]),  # one answer: below --min-correct 2
    ("Compute 3^4.", "81", ["81\nAnswer: 81", "  "]),  # another list for q1; the blank one is dropped
]


def released_rows() -> list[dict]:
    return [{"data_source": "math_dapo", "prompt": [{"role": "user", "content": TEMPLATE.format(q)}], "ability": "MATH",
             "reward_model": {"ground_truth": a, "style": "rule-lighteval/MATH_v2", "candidates": c},
             "extra_info": {"index": str(i)}} for i, (q, a, c) in enumerate(RELEASED)]


@pytest.fixture
def released(tmp_path: Path) -> Path:
    path = tmp_path / "dapo-math-17k-with-experience-pool.parquet"
    pd.DataFrame(released_rows()).to_parquet(path)
    return path


def trainer_pool(path: Path, min_correct: int = 2):
    """The pool exactly as the RLEP trainer builds it from ``rlep.pool_path``."""
    from dyjr_verl.methods.rlep.config import RLEPConfig
    from dyjr_verl.methods.rlep.trainer import load_pool

    return load_pool(RLEPConfig(pool_path=str(path), min_correct=min_correct))


def trainer_keys(train_parquet: Path) -> list[str]:
    """Question keys as the trainer computes them from the rows verl's dataset hands the rollout."""
    df = pd.read_parquet(train_parquet)
    return [question_key(p, s) for p, s in zip(df["prompt"], df["data_source"])]


def test_import_dedups_merges_and_matches_the_training_file(released: Path, tmp_path: Path,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    out, train = tmp_path / "pool.parquet", tmp_path / "train.parquet"
    assert main(["--input", str(released), "--out", str(out), "--train-out", str(train)]) == 0
    stdout = capsys.readouterr().out
    assert "5 rows, 3 distinct questions (2 duplicate rows merged); 1 empty candidates dropped" in stdout
    assert "wrote 2 questions, 6 answers" in stdout and "1 questions below --min-correct 2 dropped" in stdout

    pool = trainer_pool(out)
    keys = trainer_keys(train)
    assert len(keys) == 3 and len(pool) == 2
    q0, q1, q2 = keys
    # identical repeat lists count once; a different list for the same question is merged
    assert pool.candidates(q0) == list(RELEASED[0][2])  # not re-verified by default: "Answer: 35" is kept
    assert pool.candidates(q1) == ["3^4 = 81\nAnswer: 81", "3^4 = 81\nAnswer: 81", "81\nAnswer: 81"]
    assert q2 not in pool
    drawn = pool.draw(q1, 2, np.random.default_rng(0))
    assert len(drawn) == 2 and set(drawn) <= set(pool.candidates(q1))
    assert pool.meta["source"] == "rlep_import" and pool.meta["rescored"] is False

    # the training file written by data.math from the same rows keys identically
    plain = tmp_path / "dapo.parquet"
    pd.DataFrame([{k: v for k, v in r.items()} for r in released_rows()]).to_parquet(plain)
    assert dm.main([str(plain), "--split", "train", "-o", str(tmp_path / "train_dm.parquet")]) == 0
    assert trainer_keys(tmp_path / "train_dm.parquet") == keys
    assert pd.read_parquet(train)["reward_model"].map(lambda r: r["ground_truth"]).tolist() == ["34", "81", "4"]


def test_rescore_keeps_what_our_reward_accepts_and_dedup(released: Path, tmp_path: Path,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "pool.parquet"
    assert main(["--input", str(released), "--out", str(out), "--rescore", "--dedup", "--min-correct", "1"]) == 0
    assert "rescored with pkg://dyjr_verl.rewards.math: 6 of 7 candidates correct" in capsys.readouterr().out
    pool = trainer_pool(out, min_correct=1)
    q0, q1, q2 = (question_key([{"role": "user", "content": TEMPLATE.format(q)}], "math_dapo")
                  for q, _, _ in RELEASED[:2] + RELEASED[3:4])
    assert pool.candidates(q0) == ["17+17 = 34\nAnswer: 34", "Double 17.\nAnswer: 34"]  # "Answer: 35" dropped
    assert pool.candidates(q1) == ["3^4 = 81\nAnswer: 81", "81\nAnswer: 81"]  # --dedup: distinct strings
    assert pool.candidates(q2) == ["2, 3, 5, 7\nAnswer: 4"] and pool.meta["rescored"] is True


def test_check_train_reports_coverage_and_refuses_a_pool_that_matches_nothing(
        released: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    plain = tmp_path / "dapo.parquet"
    pd.DataFrame(released_rows()).to_parquet(plain)
    good, other = tmp_path / "train.parquet", tmp_path / "train_other.parquet"
    assert dm.main([str(plain), "-o", str(good)]) == 0
    assert dm.main([str(plain), "-o", str(other), "--data-source", "dapo17k"]) == 0
    capsys.readouterr()
    out = tmp_path / "pool.parquet"
    assert main(["--input", str(released), "--out", str(out), "--check-train", str(good)]) == 0
    assert f"2 of 3 questions of {good} are in the pool" in capsys.readouterr().out
    assert main(["--input", str(released), "--out", str(out), "--check-train", str(other)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("rlep_import: error: none of the 3 questions") and "\n" not in err
    # the same --data-source on both sides matches again
    assert main(["--input", str(released), "--out", str(out), "--check-train", str(other), "--data-source", "dapo17k"]) == 0


def test_bad_inputs_are_one_line_errors(released: Path, tmp_path: Path, repo_root: Path) -> None:
    no_cands = tmp_path / "dapo.parquet"
    rows = released_rows()
    for r in rows:
        del r["reward_model"]["candidates"]
    pd.DataFrame(rows).to_parquet(no_cands)
    bad_cands = tmp_path / "bad.parquet"
    rows = released_rows()
    for r in rows:
        r["reward_model"]["candidates"] = "Answer: 34"  # a string, not a list
    pd.DataFrame(rows).to_parquet(bad_cands)
    env = {**os.environ, "PYTHONPATH": str(repo_root)}
    cases = [
        ([str(no_cands)], "row 0: no 'reward_model.candidates' field"),
        ([str(bad_cands)], "row 0: 'reward_model.candidates' must be a list of response strings"),
        ([str(tmp_path / "missing.parquet")], "--input does not exist"),
        ([str(released), "--min-correct", "0"], "--min-correct and --reward-workers must be >= 1"),
    ]
    for inp, message in cases:
        proc = subprocess.run([sys.executable, "-m", "dyjr_verl.methods.rlep.importer", "--input", *inp,
                               "--out", str(tmp_path / "pool.parquet")], capture_output=True, text=True, env=env,
                              timeout=120)
        assert proc.returncode == 2, proc.stderr
        assert proc.stderr.startswith(f"rlep_import: error: {message}") and "Traceback" not in proc.stderr, proc.stderr
        assert proc.stderr.strip().count("\n") == 0  # tqdm writes nothing before a first-row error
    assert not (tmp_path / "pool.parquet").exists()
