"""Embedded assets are deterministic and in verl's schema; per-step metrics are read from verl's
file logger (JSON lines) and, for old logs, from its console text."""

from __future__ import annotations

import gzip
import hashlib
import math
from pathlib import Path
from unittest import mock

import numpy as np
import pandas as pd
import pytest

from dyjr_verl.analysis import steps as steps_mod
from dyjr_verl.analysis.steps import StepsError, parse_log, read_steps, table
from dyjr_verl.assets import tasks
from dyjr_verl.assets.build import AssetSpec, build
from dyjr_verl.rewards.math import compute_score

SMALL = AssetSpec(arith_train=64, arith_test=16, warmup_steps=5)


def _digest(root):
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        # sql parquet rows carry the absolute db_path of their own build: compared separately
        if p.is_file() and p.suffix in {".parquet", ".json", ".safetensors"} and p.name != "MANIFEST.json" \
                and p.parent.name != "sql":
            h.update(p.name.encode() + p.read_bytes())
    return h.hexdigest()


def test_build_is_deterministic_and_offline(tmp_path):
    a, b = build(tmp_path / "a", SMALL), build(tmp_path / "b", SMALL)
    assert _digest(a) == _digest(b)
    for split in ("train", "test"):
        da, db = (pd.read_parquet(r / "sql" / f"{split}.parquet") for r in (a, b))
        strip = lambda df: [(r.prompt[0]["content"], r.reward_model["ground_truth"]) for r in df.itertuples()]  # noqa: E731
        assert strip(da) == strip(db)
    assert (a / "tokenizer-model" / "config.json").exists()


def test_datasets_follow_verls_schema_and_score_with_the_reward(tmp_path):
    root = build(tmp_path, SMALL)
    df = pd.read_parquet(root / "arith" / "train.parquet")
    assert set(df.columns) >= {"data_source", "prompt", "ability", "reward_model", "extra_info"}
    for _, row in df.head(20).iterrows():
        gt = row.reward_model["ground_truth"]
        solution = row.extra_info["answer"]
        assert compute_score(row.data_source, solution, gt)["score"] == 1.0
        assert compute_score(row.data_source, solution.replace(f"{{{gt}}}", f"{{{int(gt) + 1}}}"), gt)["score"] == 0.0
    sql = pd.read_parquet(root / "sql" / "train.parquet")
    assert sql.extra_info.iloc[0]["db_path"].endswith("company.sqlite")


def test_model_head_dim_is_supported_by_vllm_cpu(tmp_path):
    import json

    cfg = json.loads((build(tmp_path, SMALL) / "tokenizer-model" / "config.json").read_text())
    assert cfg["hidden_size"] // cfg["num_attention_heads"] in {32, 64, 80, 96, 112, 128, 256}


def test_arithmetic_answers_are_right():
    for p in tasks.arithmetic_problems(200, seed=3):
        assert p.solution.endswith(f"\\boxed{{{p.answer}}}")
        assert eval(p.solution.split(".")[-2].split("=")[0]) == p.answer  # last step computes the answer


# -- verl's file logger (JSON lines) and the console fallback ---------------------------------------

# what a trainer step logs: floats, numpy scalars, ints, a NaN, and values that are no metric
LOGGED = {
    1: {"actor/pg_loss": -0.5, "critic/score/mean": np.float64(0.25), "response_length/mean": np.float32(12.5),
        "training/global_step": 1, "actor/grad_norm": float("nan"), "note": "abc", "hist": [1, 2], "flag": True},
    2: {"actor/pg_loss": 0.1, "critic/score/mean": 0.5, "timing_s/step": 3.25},
}
VAL_AT_2 = {"val-core/x/acc/mean@1": np.float64(0.75)}  # verl logs validation in a second call of the step
WANT = {
    1: {"actor/pg_loss": -0.5, "critic/score/mean": 0.25, "response_length/mean": 12.5, "training/global_step": 1.0,
        "actor/grad_norm": math.nan},
    2: {"actor/pg_loss": 0.1, "critic/score/mean": 0.5, "timing_s/step": 3.25, "val-core/x/acc/mean@1": 0.75},
}


def _calls():
    return [(1, LOGGED[1]), (2, LOGGED[2]), (2, VAL_AT_2)]


def _verl_file_log(path: Path) -> Path:
    """The lines verl's ``file`` backend writes (verl.utils.tracking.FileLogger, its path from the env)."""
    from verl.utils.tracking import FileLogger

    with mock.patch.dict("os.environ", {"VERL_FILE_LOGGER_PATH": str(path)}):
        logger = FileLogger("dyjr_verl", "test")
    for step, data in _calls():
        logger.log(data, step=step)
    logger.finish()
    return path


def _verl_console_log(path: Path) -> Path:
    """The same calls through verl's ``console`` backend, as a Ray actor's output reaches the log."""
    from verl.utils.logger.aggregate_logger import concat_dict_to_str

    lines = ["ray init kwargs: {...}"]
    lines += [f"\x1b[36m(TaskRunner pid=7)\x1b[0m {concat_dict_to_str(data, step=step)}" for step, data in _calls()]
    path.write_text("\n".join(lines) + "\n")
    return path


def _same(got, want):
    assert sorted(got) == sorted(want)
    for step in want:
        assert sorted(got[step]) == sorted(want[step]), step
        for k, v in want[step].items():
            assert (math.isnan(got[step][k]) and math.isnan(v)) or got[step][k] == pytest.approx(v), (step, k)


def test_step_parser_reads_verl_console_lines():
    log = [
        "\x1b[36m(TaskRunnerV1 pid=1)\x1b[0m step:1 - actor/pg_loss:-0.5 - critic/score/mean:0.25 - note:abc",
        "noise",
        "(TaskRunnerV1 pid=1) step:2 - actor/pg_loss:0.1 - critic/score/mean:0.5 - val-core/x/acc/mean@1:np.float64(0.75)",
    ]
    steps = parse_log(log)
    assert steps == {
        1: {"actor/pg_loss": -0.5, "critic/score/mean": 0.25},
        2: {"actor/pg_loss": 0.1, "critic/score/mean": 0.5, "val-core/x/acc/mean@1": 0.75},
    }
    assert "| 2 | 0.5 | 0.1 |" in table(steps, ["critic/score/mean", "actor/pg_loss"])


def test_file_logger_json_lines_are_read_and_agree_with_the_console(tmp_path):
    metrics = _verl_file_log(tmp_path / "metrics.jsonl")
    assert metrics.read_text().startswith('{"step":1,"data":{')  # verl's format, one record per log call
    _same(read_steps(metrics), WANT)
    console = read_steps(_verl_console_log(tmp_path / "main_ppo.log"))  # told apart by content
    _same(console, WANT)
    for plain in (metrics, tmp_path / "main_ppo.log"):  # gzipped (the experiment launcher keeps them so)
        gz = plain.with_name(plain.name + ".gz")
        gz.write_bytes(gzip.compress(plain.read_bytes()))
        _same(read_steps(gz), WANT)


def test_bad_json_lines_are_one_error_naming_file_and_line(tmp_path, capsys):
    bad = _verl_file_log(tmp_path / "metrics.jsonl")
    with bad.open("a") as f:
        f.write('{"step":3,"data":{"actor/pg_loss":0.')  # a run killed mid-write
    with pytest.raises(StepsError, match=r"metrics\.jsonl:4: not a JSON line"):
        read_steps(bad)
    odd = tmp_path / "odd.jsonl"
    odd.write_text('{"step":1,"data":{"a":1}}\n\n[1, 2]\n')
    with pytest.raises(StepsError, match=r"odd\.jsonl:3: not a file-logger record"):
        read_steps(odd)
    with pytest.raises(StepsError, match="no such file"):
        read_steps(tmp_path / "missing.jsonl")
    assert steps_mod.main([str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "metrics.jsonl:4" in err


def test_steps_cli_prints_the_table_of_a_finished_run(tmp_path, capsys):
    metrics = _verl_file_log(tmp_path / "metrics.jsonl")
    assert steps_mod.main([str(metrics), "--keys", "critic/score/mean", "timing_s/step"]) == 0
    out = capsys.readouterr().out
    assert "| step | critic/score/mean | timing_s/step |" in out and "| 2 | 0.5 | 3.25 |" in out
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    assert steps_mod.main([str(empty)]) == 1


@pytest.mark.parametrize("recipe", ["grpo_tiny_cpu", "dyjr_sql_tiny_cpu", "grpo_math", "dyjr_sql", "dapo_phase1_math",
                                    "dyjr_math_megatron"])
def test_recipes_log_console_and_file_with_wandb_opt_in(recipe, tmp_path, monkeypatch):
    from hydra import compose, initialize_config_dir

    from dyjr_verl.recipes import recipes_dir

    monkeypatch.setenv("DYJR_ASSETS_DIR", str(tmp_path))
    data = ["data.train_files=/x/t.parquet", "data.val_files=/x/v.parquet"]
    with initialize_config_dir(config_dir=str(recipes_dir()), version_base=None):
        assert list(compose(config_name=recipe, overrides=data).trainer.logger) == ["console", "file"]
        opt_in = compose(config_name=recipe, overrides=[*data, "trainer.logger=[console,file,wandb]"])
        assert list(opt_in.trainer.logger) == ["console", "file", "wandb"]


