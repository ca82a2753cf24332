"""Data-prep CLIs: real shared files -> verl parquet, read back with pandas, gold answers score 1."""

from __future__ import annotations

import json
import os
import re
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from dyjr_verl.data import math as dm
from dyjr_verl.data import sql as ds
from dyjr_verl.data.schema import VERL_COLUMNS, looks_like_hub_name, make_row
from dyjr_verl.rewards import math as mr
from dyjr_verl.rewards import sql as sr


def _check_verl_schema(df: pd.DataFrame, ability: str, split: str) -> None:
    assert list(df.columns) == list(VERL_COLUMNS)
    for i, row in enumerate(df.itertuples(index=False)):
        assert isinstance(row.data_source, str) and row.data_source
        assert len(row.prompt) == 1 and row.prompt[0]["role"] == "user" and row.prompt[0]["content"].strip()
        assert row.ability == ability
        assert row.reward_model["style"] == "rule" and row.reward_model["ground_truth"].strip()
        assert row.extra_info["split"] == split and row.extra_info["index"] == i
        assert row.extra_info["answer"] == row.reward_model["ground_truth"]
        assert row.extra_info["question"]


def _cli_error(main, argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err
    return err


# --------------------------------------------------------------------------------------------------
# math


@pytest.mark.parametrize(("name", "rows"), [("math500", 500), ("aime24", 30), ("aime25", 30), ("amc23", 40)])
def test_math_cli_on_shared_files(shared_data: Path, tmp_path: Path, name: str, rows: int) -> None:
    out = tmp_path / f"{name}.parquet"
    assert dm.main([str(shared_data / "math" / f"{name}.jsonl"), "--output", str(out)]) == 0
    df = pd.read_parquet(out)
    assert len(df) == rows
    _check_verl_schema(df, "math", "test")
    assert set(df["data_source"]) == {name}
    src = [json.loads(line) for line in (shared_data / "math" / f"{name}.jsonl").read_text().splitlines()]
    first = df.iloc[0]
    assert first["prompt"][0]["content"].startswith(src[0]["problem"].strip())
    assert first["prompt"][0]["content"].endswith(dm.MATH_INSTRUCTION)
    assert first["extra_info"]["id"] == src[0]["id"]
    # the reward agrees with the stored gold on a few rows
    golds = list(df["reward_model"].map(lambda r: r["ground_truth"]))[:8]
    out_scores = mr.compute_score_batch(None, [f"so \\boxed{{{g}}}" for g in golds], golds)
    assert [o["score"] for o in out_scores] == [1.0] * len(golds)


def test_math_cli_limit_seed_and_split(shared_data: Path, tmp_path: Path) -> None:
    src = str(shared_data / "math" / "math_train_2k.jsonl")
    a, b, c = (tmp_path / f"{x}.parquet" for x in "abc")
    args = ["--split", "train", "--limit", "16", "--seed", "7", "--data-source", "math_train"]
    assert dm.main([src, "-o", str(a), *args]) == 0
    assert dm.main([src, "-o", str(b), *args]) == 0
    assert dm.main([src, "-o", str(c), "--split", "train", "--limit", "16"]) == 0
    da, db, dc = (pd.read_parquet(p) for p in (a, b, c))
    _check_verl_schema(da, "math", "train")
    assert len(da) == 16 and set(da["data_source"]) == {"math_train"}
    assert list(da["extra_info"].map(lambda e: e["id"])) == list(db["extra_info"].map(lambda e: e["id"]))
    assert list(dc["extra_info"].map(lambda e: e["source_index"])) == list(range(16))
    assert list(da["extra_info"].map(lambda e: e["source_index"])) != list(range(16))


def test_math_cli_other_formats(tmp_path: Path) -> None:
    """JSON list with a GSM8K-style answer, parquet with a MATH-style solution, custom keys."""
    gsm = tmp_path / "gsm.json"
    gsm.write_text(json.dumps([{"question": "2+2?", "answer": "2+2=4\n#### 4"}]))
    assert dm.main([str(gsm), "-o", str(tmp_path / "gsm.parquet")]) == 0
    assert pd.read_parquet(tmp_path / "gsm.parquet").iloc[0]["reward_model"]["ground_truth"] == "4"
    pq = tmp_path / "test.parquet"
    pd.DataFrame([{"problem": "1/2 as a fraction?", "solution": "It is $\\boxed{\\frac{1}{2}}$."}]).to_parquet(pq)
    out = tmp_path / "out" / "sol.parquet"
    assert dm.main([str(pq), "-o", str(out)]) == 0
    df = pd.read_parquet(out)
    assert df.iloc[0]["reward_model"]["ground_truth"] == "\\frac{1}{2}"
    # a generic stem ("test") takes the parent folder's name as data_source
    assert df.iloc[0]["data_source"] == re.sub(r"[^a-z0-9]+", "_", tmp_path.name.lower()).strip("_")
    custom = tmp_path / "custom.jsonl"
    custom.write_text(json.dumps({"q": "Say 3.", "gt": 3}) + "\n")
    assert dm.main([str(custom), "-o", str(tmp_path / "c.parquet"), "--problem-key", "q", "--answer-key", "gt"]) == 0
    assert pd.read_parquet(tmp_path / "c.parquet").iloc[0]["reward_model"]["ground_truth"] == "3"


def test_math_cli_errors(shared_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ok_src = str(shared_data / "math" / "aime24.jsonl")
    assert "input not found" in _cli_error(dm.main, [str(tmp_path / "missing.jsonl"), "-o", str(tmp_path / "x.parquet")], capsys)
    assert ".parquet" in _cli_error(dm.main, [ok_src, "-o", str(tmp_path / "x.csv")], capsys)
    assert "--limit" in _cli_error(dm.main, [ok_src, "-o", str(tmp_path / "x.parquet"), "--limit", "-1"], capsys)
    assert "no rows" in _cli_error(dm.main, [ok_src, "-o", str(tmp_path / "x.parquet"), "--limit", "0"], capsys)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"problem": "p", "answer": "1"}\n{not json}\n')
    assert "bad.jsonl:2: not a JSON line" in _cli_error(dm.main, [str(bad), "-o", str(tmp_path / "x.parquet")], capsys)
    nokey = tmp_path / "nokey.jsonl"
    nokey.write_text('{"text": "p", "answer": "1"}\n')
    err = _cli_error(dm.main, [str(nokey), "-o", str(tmp_path / "x.parquet")], capsys)
    assert "record 0: no problem field" in err and "found answer, text" in err
    txt = tmp_path / "data.txt"
    txt.write_text("hello")
    assert "unsupported input type" in _cli_error(dm.main, [str(txt), "-o", str(tmp_path / "x.parquet")], capsys)
    unbalanced = tmp_path / "u.jsonl"
    unbalanced.write_text(json.dumps({"problem": "p", "solution": "\\boxed{1"}) + "\n")
    assert "unbalanced" in _cli_error(dm.main, [str(unbalanced), "-o", str(tmp_path / "x.parquet")], capsys)


def test_hub_dataset_path_fails_cleanly_offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    """The hub code path exists; with no network it must end in one clear error line, not a traceback."""
    assert looks_like_hub_name("HuggingFaceH4/MATH-500") and not looks_like_hub_name("math500.jsonl")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    err = _cli_error(dm.main, ["dyjr-test/definitely-not-cached", "-o", str(tmp_path / "x.parquet")], capsys)
    assert "cannot load hub dataset 'dyjr-test/definitely-not-cached'" in err


def test_math_module_runs_as_a_script(shared_data: Path, tmp_path: Path, repo_root: Path) -> None:
    out = tmp_path / "a.parquet"
    env = {**os.environ, "PYTHONPATH": str(repo_root)}
    ok = subprocess.run([sys.executable, "-m", "dyjr_verl.data.math", str(shared_data / "math" / "aime25.jsonl"),
                         "--output", str(out), "--limit", "3"], capture_output=True, text=True, env=env, timeout=120)
    assert ok.returncode == 0, ok.stderr
    assert len(pd.read_parquet(out)) == 3
    bad = subprocess.run([sys.executable, "-m", "dyjr_verl.data.math", str(tmp_path / "nope.jsonl"), "--output", str(out)],
                         capture_output=True, text=True, env=env, timeout=120)
    assert bad.returncode == 2 and bad.stderr.startswith("error: input not found")


def test_make_row_rejects_empty_fields() -> None:
    with pytest.raises(ValueError, match="empty prompt"):
        make_row(data_source="x", prompt=" ", ability="math", ground_truth="1", split="test", index=0)
    with pytest.raises(ValueError, match="empty ground truth"):
        make_row(data_source="x", prompt="p", ability="math", ground_truth="", split="test", index=0)


# --------------------------------------------------------------------------------------------------
# SQL


@pytest.fixture(scope="module")
def spider_parquet(shared_data: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[pd.DataFrame, Path]:
    tmp = tmp_path_factory.mktemp("sqlprep")
    out, dbs = tmp / "spider_dev.parquet", tmp / "dbs"
    assert ds.main([str(shared_data / "spider"), "--output", str(out), "--build-db-dir", str(dbs), "--sample-rows", "2"]) == 0
    return pd.read_parquet(out), dbs


def test_sql_cli_on_spider_layout(spider_parquet: tuple[pd.DataFrame, Path], shared_data: Path) -> None:
    df, dbs = spider_parquet
    assert len(df) == 461
    _check_verl_schema(df, "sql", "dev")
    assert set(df["data_source"]) == {"spider"}
    src = [json.loads(line) for line in (shared_data / "spider" / "dev.jsonl").read_text().splitlines()]
    assert list(df["reward_model"].map(lambda r: r["ground_truth"])) == [r["query"] for r in src]
    assert list(df["extra_info"].map(lambda e: e["db_id"])) == [r["db_id"] for r in src]
    assert sorted(p.parent.name for p in dbs.glob("*/*.sqlite")) == sorted({r["db_id"] for r in src})
    for info in df["extra_info"]:
        assert Path(info["db_path"]).is_file() and Path(info["db_path"]).is_absolute()
    first = df.iloc[0]["prompt"][0]["content"]
    assert 'CREATE TABLE "singer"' in first and "Question: How many singers do we have?" in first
    assert "example rows from singer" in first


def test_sql_rows_score_gold_one(spider_parquet: tuple[pd.DataFrame, Path]) -> None:
    df, dbs = spider_parquet
    sample = df.iloc[::40]
    golds = [r["ground_truth"] for r in sample["reward_model"]]
    infos = [dict(e) for e in sample["extra_info"]]
    out = sr.compute_score_batch(list(sample["data_source"]), [f"```sql\n{g}\n```" for g in golds], golds, infos)
    assert [o["status"] for o in out] == ["correct"] * len(golds)
    by_id = [{"db_id": e["db_id"]} for e in infos]  # the same through db_id + db_root
    out = sr.compute_score_batch(None, [f"<answer>{g}</answer>" for g in golds], golds, by_id, db_root=str(dbs))
    assert [o["score"] for o in out] == [1.0] * len(golds)


def test_sql_cli_limit_seed(shared_data: Path, spider_parquet: tuple[pd.DataFrame, Path], tmp_path: Path) -> None:
    _, dbs = spider_parquet
    out = tmp_path / "s.parquet"
    assert ds.main([str(shared_data / "spider"), "-o", str(out), "--db-root", str(dbs), "--limit", "5", "--seed", "3",
                    "--data-source", "spider_small"]) == 0
    df = pd.read_parquet(out)
    assert len(df) == 5 and set(df["data_source"]) == {"spider_small"}
    assert "example row" not in df.iloc[0]["prompt"][0]["content"]


def test_sql_cli_on_bird_layout(spider_parquet: tuple[pd.DataFrame, Path], tmp_path: Path) -> None:
    """A miniature BIRD directory: dev.json (question/evidence/SQL/db_id) + dev_databases/."""
    _, dbs = spider_parquet
    bird = tmp_path / "bird"
    (bird / "dev_databases" / "pets_1").mkdir(parents=True)
    shutil.copy(dbs / "pets_1" / "pets_1.sqlite", bird / "dev_databases" / "pets_1" / "pets_1.sqlite")
    questions = [
        {"question_id": 0, "db_id": "pets_1", "question": "How many students are older than 20?",
         "evidence": "older than 20 refers to Age > 20", "SQL": "SELECT count(*) FROM Student WHERE Age > 20",
         "difficulty": "simple"},
        {"question_id": 1, "db_id": "pets_1", "question": "How many pets are there?", "evidence": "",
         "SQL": "SELECT count(*) FROM Pets", "difficulty": "simple"},
    ]
    (bird / "dev.json").write_text(json.dumps(questions))
    out = tmp_path / "bird.parquet"
    assert ds.main([str(bird), "-o", str(out)]) == 0
    df = pd.read_parquet(out)
    _check_verl_schema(df, "sql", "dev")
    assert set(df["data_source"]) == {"bird"}
    assert "External knowledge: older than 20 refers to Age > 20" in df.iloc[0]["prompt"][0]["content"]
    assert "External knowledge" not in df.iloc[1]["prompt"][0]["content"]
    assert df.iloc[0]["extra_info"]["evidence"] == "older than 20 refers to Age > 20"
    g = df.iloc[0]["reward_model"]["ground_truth"]
    assert sr.compute_score("bird", f"```sql\n{g}\n```", g, dict(df.iloc[0]["extra_info"]))["score"] == 1.0


def test_sql_cli_on_a_jsonl_file_with_db_root(spider_parquet: tuple[pd.DataFrame, Path], shared_data: Path,
                                             tmp_path: Path) -> None:
    _, dbs = spider_parquet
    out = tmp_path / "f.parquet"
    assert ds.main([str(shared_data / "spider" / "dev.jsonl"), "-o", str(out), "--db-root", str(dbs), "--limit", "3"]) == 0
    df = pd.read_parquet(out)
    assert len(df) == 3 and set(df["data_source"]) == {"dev"}


def test_sql_cli_errors(shared_data: Path, spider_parquet: tuple[pd.DataFrame, Path], tmp_path: Path,
                        capsys: pytest.CaptureFixture[str]) -> None:
    _, dbs = spider_parquet
    out = str(tmp_path / "x.parquet")
    spider = str(shared_data / "spider")
    assert "--build-db-dir" in _cli_error(ds.main, [spider, "-o", out], capsys)
    assert "split 'test'" in _cli_error(ds.main, [spider, "-o", out, "--split", "test", "--build-db-dir", str(dbs)], capsys)
    assert "not a Spider" in _cli_error(ds.main, [str(tmp_path), "-o", out], capsys)
    assert "not found under" in _cli_error(ds.main, [str(shared_data / "spider" / "dev.jsonl"), "-o", out], capsys)
    assert "--db-root" in _cli_error(ds.main, [spider, "-o", out, "--db-root", str(tmp_path / "nope")], capsys)
    assert "--sample-rows" in _cli_error(ds.main, [spider, "-o", out, "--sample-rows", "-1"], capsys)
    rows = tmp_path / "q.jsonl"
    rows.write_text(json.dumps({"question": "q", "db_id": "pets_1"}) + "\n")
    assert "no gold SQL field" in _cli_error(ds.main, [str(rows), "-o", out, "--db-root", str(dbs)], capsys)
    evil = tmp_path / "evil.jsonl"
    evil.write_text(json.dumps({"question": "q", "query": "SELECT 1", "db_id": "../etc"}) + "\n")
    assert "invalid db_id" in _cli_error(ds.main, [str(evil), "-o", out, "--db-root", str(dbs)], capsys)
    assert "input not found" in _cli_error(ds.main, [str(tmp_path / "missing"), "-o", out], capsys)


def test_sql_module_runs_as_a_script(shared_data: Path, spider_parquet: tuple[pd.DataFrame, Path], tmp_path: Path,
                                     repo_root: Path) -> None:
    _, dbs = spider_parquet
    out = tmp_path / "s.parquet"
    env = {**os.environ, "PYTHONPATH": str(repo_root)}
    proc = subprocess.run([sys.executable, "-m", "dyjr_verl.data.sql", str(shared_data / "spider"), "--output", str(out),
                           "--db-root", str(dbs), "--limit", "4"], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert len(pd.read_parquet(out)) == 4
    # the built databases are untouched by data prep and by scoring
    conn = sqlite3.connect(dbs / "pets_1" / "pets_1.sqlite")
    assert conn.execute("SELECT count(*) FROM Student").fetchone()[0] > 0
    conn.close()


def test_input_as_option(shared_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = str(shared_data / "math" / "aime24.jsonl")
    assert dm.main(["--input", src, "-o", str(tmp_path / "a.parquet"), "--limit", "2"]) == 0
    assert len(pd.read_parquet(tmp_path / "a.parquet")) == 2
    assert "no input given" in _cli_error(dm.main, ["-o", str(tmp_path / "b.parquet")], capsys)
    other = str(shared_data / "math" / "aime25.jsonl")
    assert "two different inputs" in _cli_error(dm.main, [src, "--input", other, "-o", str(tmp_path / "b.parquet")], capsys)
    assert "no input given" in _cli_error(ds.main, ["-o", str(tmp_path / "c.parquet")], capsys)
