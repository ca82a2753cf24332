"""DAPO-Math-17k's format through ``python -m dyjr_verl.data.math`` (chat-message prompts, the answer
under ``reward_model.ground_truth``, every prompt repeated), on small files in DAPO's shape written
here; and the phase-1 recipe RLEP collects from."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from dyjr_verl.data import math as dm
from dyjr_verl.data.schema import VERL_COLUMNS
from dyjr_verl.rewards import math as mr

DAPO_TEMPLATE = ("Solve the following math problem step by step. The last line of your response should be of the "
                 "form Answer: $Answer (without quotes) where $Answer is the answer to the problem.\n\n{}\n\n"
                 'Remember to put your answer on its own line after "Answer:".')
PROBLEMS = [("What is 17 + 17?", "34"), ("How many primes are below 10?", "4"), ("Compute 3^4.", "81")]


def dapo_rows(repeats: int = 4) -> list[dict]:
    """DAPO-Math-17k's row shape; the file cycles through its prompts, each ``repeats`` times."""
    return [
        {"data_source": "math_dapo", "prompt": [{"role": "user", "content": DAPO_TEMPLATE.format(q)}], "ability": "MATH",
         "reward_model": {"ground_truth": a, "style": "rule-lighteval/MATH_v2"},
         "extra_info": {"index": f"{i}-{r}"}}
        for r in range(repeats) for i, (q, a) in enumerate(PROBLEMS)
    ]


def write_dapo(path: Path, rows: list[dict]) -> Path:
    if path.suffix == ".parquet":
        pd.DataFrame(rows).to_parquet(path)
    else:
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _cli_error(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    assert dm.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err
    return err


@pytest.mark.parametrize("suffix", [".parquet", ".jsonl"])
def test_dapo_rows_become_our_verl_rows_once_each(tmp_path: Path, suffix: str, capsys: pytest.CaptureFixture[str]) -> None:
    src = write_dapo(tmp_path / f"dapo-math-17k{suffix}", dapo_rows(repeats=4))
    out = tmp_path / "train.parquet"
    assert dm.main([str(src), "--split", "train", "-o", str(out)]) == 0
    stdout = capsys.readouterr().out
    assert "dropped 9 duplicate rows" in stdout and "wrote 3 rows" in stdout
    df = pd.read_parquet(out)
    assert list(df.columns) == list(VERL_COLUMNS) and len(df) == 3
    for i, row in enumerate(df.itertuples(index=False)):
        q, a = PROBLEMS[i]
        # the user text verbatim (its own "Answer:" instruction, nothing appended), the bare answer
        assert [dict(m) for m in row.prompt] == [{"role": "user", "content": DAPO_TEMPLATE.format(q)}]
        assert row.reward_model["ground_truth"] == a and row.reward_model["style"] == "rule"
        assert row.data_source == "math_dapo" and row.ability == "math"
        assert row.extra_info["split"] == "train" and row.extra_info["index"] == i
        assert row.extra_info["source_index"] == i and row.extra_info["answer"] == a
        assert row.extra_info["question"] == DAPO_TEMPLATE.format(q)
    # our reward reads the answer format the DAPO prompt asks for
    golds = [a for _, a in PROBLEMS]
    scores = mr.compute_score_batch(None, [f"So the sum is...\nAnswer: {g}" for g in golds], golds)
    assert [s["score"] for s in scores] == [1.0, 1.0, 1.0]


def test_dapo_limit_seed_options_and_keep_duplicates(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = write_dapo(tmp_path / "dapo.parquet", dapo_rows(repeats=5))
    two, keep, named = (tmp_path / f"{x}.parquet" for x in ("two", "keep", "named"))
    assert dm.main([str(src), "-o", str(two), "--limit", "2", "--seed", "1"]) == 0  # --limit counts distinct prompts
    d2 = pd.read_parquet(two)
    assert len(d2) == 2 and d2["prompt"].map(lambda p: p[0]["content"]).nunique() == 2
    capsys.readouterr()
    assert dm.main([str(src), "-o", str(keep), "--keep-duplicates"]) == 0
    assert len(pd.read_parquet(keep)) == 15 and "duplicate" not in capsys.readouterr().out
    # explicit dotted keys, another data_source, and an instruction on request
    assert dm.main([str(src), "-o", str(named), "--problem-key", "prompt", "--answer-key", "reward_model.ground_truth",
                    "--data-source", "dapo", "--instruction", "Box it."]) == 0
    dn = pd.read_parquet(named)
    assert set(dn["data_source"]) == {"dapo"} and len(dn) == 3
    assert dn.iloc[0]["prompt"][0]["content"] == DAPO_TEMPLATE.format(PROBLEMS[0][0]) + "\n\nBox it."


def test_plain_duplicates_are_dropped_and_conflicting_answers_reported(tmp_path: Path,
                                                                      capsys: pytest.CaptureFixture[str]) -> None:
    src = tmp_path / "qa.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in [
        {"problem": "1+1?", "answer": "2"}, {"problem": "1+1?", "answer": "2"}, {"problem": "1+1?", "answer": "3"},
        {"problem": "2+2?", "answer": "4"}]))
    assert dm.main([str(src), "-o", str(tmp_path / "o.parquet")]) == 0
    out = capsys.readouterr().out
    assert "dropped 2 duplicate rows" in out and "1 of them with a different answer" in out
    df = pd.read_parquet(tmp_path / "o.parquet")
    assert list(df["reward_model"].map(lambda r: r["ground_truth"])) == ["2", "4"]
    assert df.iloc[0]["prompt"][0]["content"].endswith(dm.MATH_INSTRUCTION)  # plain problems keep the instruction


def test_wrong_answer_or_prompt_fields_are_errors_never_reprs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = write_dapo(tmp_path / "dapo.parquet", dapo_rows(repeats=1))
    out = tmp_path / "x.parquet"
    err = _cli_error([str(src), "-o", str(out), "--answer-key", "reward_model"], capsys)
    assert "'reward_model' is a dict" in err and "--answer-key reward_model.ground_truth" in err
    err = _cli_error([str(src), "-o", str(out), "--answer-key", "prompt"], capsys)
    assert "answer field 'prompt' is a list of 1 dicts" in err
    err = _cli_error([str(src), "-o", str(out), "--problem-key", "reward_model"], capsys)
    assert "problem field 'reward_model' is a dict" in err
    assert "no answer field" in _cli_error([str(src), "-o", str(out), "--answer-key", "reward_model.answer"], capsys)
    assert not out.exists()
    # a system prompt would be dropped: refused rather than converted
    rows = dapo_rows(repeats=1)
    rows[1]["prompt"] = [{"role": "system", "content": "Be brief."}, *rows[1]["prompt"]]
    sys_src = write_dapo(tmp_path / "sys.parquet", rows)
    err = _cli_error([str(sys_src), "-o", str(out)], capsys)
    assert err.startswith("error: record 1:") and "roles ['system', 'user']" in err
    assert not out.exists()


def test_module_error_is_one_line_with_exit_2(tmp_path: Path, repo_root: Path) -> None:
    src = write_dapo(tmp_path / "dapo.parquet", dapo_rows(repeats=1))
    env = {**os.environ, "PYTHONPATH": str(repo_root)}
    proc = subprocess.run([sys.executable, "-m", "dyjr_verl.data.math", str(src), "-o", str(tmp_path / "x.parquet"),
                           "--answer-key", "reward_model"], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.startswith("error: record 0:") and proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr


# -- the phase-1 recipe ------------------------------------------------------------------------------


def test_phase1_recipe_composes_with_rleps_baseline_settings(repo_root: Path) -> None:
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    with initialize_config_dir(config_dir=str(repo_root / "dyjr_verl" / "recipes"), version_base=None):
        cfg = compose(config_name="dapo_phase1_math",
                      overrides=["data.train_files=/x/train.parquet", "data.val_files=/x/val.parquet"])
    actor, rollout = cfg.actor_rollout_ref.actor, cfg.actor_rollout_ref.rollout
    assert cfg.data.train_batch_size == 512 and actor.ppo_mini_batch_size == 64 and rollout.n == 16
    assert cfg.data.max_prompt_length + cfg.data.max_response_length <= 4096  # Qwen2.5-Math-7B's window
    assert (actor.clip_ratio_low, actor.clip_ratio_high, actor.clip_ratio_c) == (0.2, 0.28, 10.0)
    assert actor.loss_agg_mode == "token-mean" and not actor.use_kl_loss and not cfg.algorithm.use_kl_in_reward
    assert actor.entropy_coeff == 0.0 and cfg.algorithm.adv_estimator == "grpo"
    assert (actor.optim.lr, actor.optim.lr_warmup_steps, actor.optim.weight_decay) == (1e-6, 10, 0.1)
    assert rollout.temperature == 1.0 and rollout.top_p == 1.0
    # no replay node: the plain baseline; its step-400 checkpoint is saved
    assert OmegaConf.select(cfg, "rlep") is None and OmegaConf.select(cfg, "dyjr") is None
    steps = cfg.trainer.total_training_steps
    assert steps == 400 and steps % cfg.trainer.save_freq == 0
    assert cfg.trainer.total_epochs * (17_917 // 512) >= steps  # the epoch bound never ends the run first
    assert cfg.reward.custom_reward_function.path == "pkg://dyjr_verl.rewards.math"


def test_a_stringified_message_list_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """What the old converter wrote (a repr of the message list) is itself refused as input."""
    src = tmp_path / "repr.jsonl"
    src.write_text(json.dumps({"prompt": str([{"role": "user", "content": "1+1?"}]), "answer": "2"}) + "\n")
    err = _cli_error([str(src), "-o", str(tmp_path / "x.parquet")], capsys)
    assert "record 0: problem field 'prompt' is the text of a chat-message list" in err


def test_lists_of_reference_answers_are_kept_whole(tmp_path):
    """Several reference answers: every one stays a gold (the reward accepts any), not just the first."""
    import pandas as pd

    from dyjr_verl.rewards.math import compute_score

    src = tmp_path / "multi.jsonl"
    src.write_text("\n".join(json.dumps(r) for r in [
        {"problem": "Name a root of x^2 = 4.", "answer": ["2", "-2"]},
        {"problem": "What is 1 + 1?", "answer": "2"},
    ]) + "\n")
    out = tmp_path / "multi.parquet"
    assert dm.main(["--input", str(src), "--output", str(out), "--split", "test"]) == 0
    df = pd.read_parquet(out)
    golds = [list(g) for g in df["reward_model"].map(lambda r: r["ground_truth"])]
    assert golds == [["2", "-2"], ["2"]]
    score = compute_score(df["data_source"][0], "So x = \\boxed{-2}.", df["reward_model"][0]["ground_truth"])
    assert (score["score"] if isinstance(score, dict) else score) == 1.0
