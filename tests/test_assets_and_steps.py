"""Embedded assets are deterministic and in verl's schema; the step-log parser reads verl's console."""

from __future__ import annotations

import hashlib

import pandas as pd

from dyjr_verl.analysis.steps import parse_log, table
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
