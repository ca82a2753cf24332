"""The final-stated-number reward (dyjr_verl/rewards/final_number.py) and the collapse word problems."""

import pandas as pd
import pytest

from dyjr_verl.experiments import collapse_data
from dyjr_verl.rewards.final_number import compute_score, final_number


@pytest.mark.parametrize("text, gold, score", [
    ("so he has 3 + 5 = 8 apples.", "8", 1.0),          # prose: the last number is the answer
    ("The final answer is 1,200.", "1200", 1.0),        # thousands comma
    ("He has 8 now, then gives 2: 6", "8", 0.0),        # only the final number counts
    ("Eve has -3 pens", "-3", 1.0),
    ("12.50 dollars", "12.5", 1.0),
    ("no number here", "4", 0.0),
])
def test_scores_the_final_number(text, gold, score):
    result = compute_score(data_source="dyjr/arithmetic", solution_str=text, ground_truth=gold)
    assert result["score"] == score
    assert set(result) == {"score", "acc", "pred", "timeout", "format_ok", "status"}


def test_no_number_is_no_answer():
    result = compute_score(solution_str="nothing", ground_truth="3")
    assert (result["status"], result["format_ok"], result["pred"]) == ("no_answer", False, "")
    assert final_number("a 1 b 22 c") == "22"


def test_refuses_bad_gold_and_unknown_option():
    with pytest.raises(ValueError, match="plain number"):
        compute_score(solution_str="5", ground_truth="x + 1")
    with pytest.raises(ValueError, match="unknown reward_kwargs"):
        compute_score(solution_str="5", ground_truth="5", extract="boxed")


def test_collapse_splits_are_disjoint_and_deterministic(tmp_path):
    paths = collapse_data.build(tmp_path / "a")
    again = collapse_data.build(tmp_path / "b")
    frames = {s: pd.read_parquet(p) for s, p in paths.items()}
    assert {s: len(f) for s, f in frames.items()} == collapse_data.SPLITS
    questions = [set(f.extra_info.map(lambda e: e["question"])) for f in frames.values()]
    assert not (questions[0] & questions[1] or questions[0] & questions[2] or questions[1] & questions[2])
    assert frames["val"].equals(pd.read_parquet(again["val"]))
    assert frames["train"].prompt[0][0]["content"].endswith(collapse_data.INSTRUCTION)


def test_collapse_data_refuses_bad_share(tmp_path, capsys):
    assert collapse_data.main(["--out", str(tmp_path), "--two-step-share", "1.5"]) == 2
    assert capsys.readouterr().err.startswith("error: --two-step-share")
