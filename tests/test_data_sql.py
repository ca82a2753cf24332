"""Text-to-SQL data prep details: Spider's two training files, ``test_database/``, and ``db_path`` stored
relative to a data root that training mounts elsewhere (``--relative-to`` here, reward kwarg ``db_root`` there).

Real Spider questions and ``schema.sql`` files from ../shared/data/spider, rearranged into the layouts of
the official releases (which are not available offline).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pandas as pd
import pytest

from dyjr_verl.data import sql as ds
from dyjr_verl.rewards import sql as sr


def _cli_error(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    assert ds.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err
    return err


@pytest.fixture(scope="module")
def spider_rows(shared_data: Path) -> dict[str, list[dict]]:
    rows = [json.loads(line) for line in (shared_data / "spider" / "dev.jsonl").read_text().splitlines()]
    by_db: dict[str, list[dict]] = {}
    for r in rows:
        by_db.setdefault(r["db_id"], []).append({k: r[k] for k in ("db_id", "question", "query")})
    return by_db


def _spider_dir(root: Path, shared_data: Path, files: dict[str, list[dict]], db_dirs: dict[str, list[str]]) -> Path:
    """A Spider release directory: question files (JSON lists, as Spider ships them) + database dirs."""
    root.mkdir(parents=True)
    for name, rows in files.items():
        (root / name).write_text(json.dumps(rows))
    for dirname, db_ids in db_dirs.items():
        for db_id in db_ids:
            (root / dirname / db_id).mkdir(parents=True)
            shutil.copy(shared_data / "spider" / "database" / db_id / "schema.sql", root / dirname / db_id / "schema.sql")
    return root


def _golds_score_one(df: pd.DataFrame, **kwargs) -> None:
    golds = [r["ground_truth"] for r in df["reward_model"]]
    out = sr.compute_score_batch(list(df["data_source"]), [f"```sql\n{g}\n```" for g in golds], golds,
                                 [dict(e) for e in df["extra_info"]], **kwargs)
    assert [o["status"] for o in out] == ["correct"] * len(golds)


def test_spider_train_split_reads_train_spider_and_train_others(shared_data: Path, spider_rows: dict[str, list[dict]],
                                                                tmp_path: Path) -> None:
    train_spider = spider_rows["concert_singer"][:4] + spider_rows["pets_1"][:3]
    train_others = spider_rows["orchestra"][:3]  # Spider's others: questions from earlier datasets, same layout
    spider = _spider_dir(tmp_path / "spider", shared_data,
                         {"train_spider.json": train_spider, "train_others.json": train_others, "dev.json": []},
                         {"database": ["concert_singer", "pets_1", "orchestra"]})
    out = tmp_path / "train.parquet"
    assert ds.main([str(spider), "--split", "train", "--build-db-dir", str(tmp_path / "dbs"), "-o", str(out)]) == 0
    df = pd.read_parquet(out)
    assert len(df) == 10  # before: train_others.json was never read (7 rows)
    assert [r["ground_truth"] for r in df["reward_model"]] == [r["query"] for r in train_spider + train_others]
    assert [e["split"] for e in df["extra_info"]] == ["train"] * 10
    assert list(df["extra_info"].map(lambda e: e["source_index"])) == list(range(10))
    _golds_score_one(df)
    # a train.json of its own (a re-split) still wins over Spider's pair
    (spider / "train.json").write_text(json.dumps(train_others))
    assert ds.main([str(spider), "--split", "train", "--build-db-dir", str(tmp_path / "dbs"), "-o", str(out)]) == 0
    assert len(pd.read_parquet(out)) == 3


def test_spider_test_split_finds_test_database(shared_data: Path, spider_rows: dict[str, list[dict]],
                                               tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Newer Spider releases ship the test split's databases in test_database/, beside database/."""
    test_rows = spider_rows["poker_player"][:3] + spider_rows["network_1"][:2]
    spider = _spider_dir(tmp_path / "spider", shared_data, {"test.json": test_rows, "dev.json": spider_rows["pets_1"][:2]},
                         {"database": ["pets_1"], "test_database": ["pets_1", "poker_player", "network_1"]})
    out = tmp_path / "test.parquet"
    assert ds.main([str(spider), "--split", "test", "--build-db-dir", str(tmp_path / "dbs"), "-o", str(out)]) == 0
    df = pd.read_parquet(out)
    assert len(df) == 5 and set(df["data_source"]) == {"spider"}
    _golds_score_one(df)
    # dev still reads database/; a directory with only test_database/ is a Spider directory too
    assert ds.main([str(spider), "--build-db-dir", str(tmp_path / "dbs"), "-o", str(tmp_path / "dev.parquet")]) == 0
    assert len(pd.read_parquet(tmp_path / "dev.parquet")) == 2
    shutil.rmtree(spider / "database")
    assert ds.main([str(spider), "--split", "test", "--build-db-dir", str(tmp_path / "dbs2"), "-o", str(out)]) == 0
    assert len(pd.read_parquet(out)) == 5
    shutil.rmtree(spider / "test_database")
    assert "not a Spider" in _cli_error([str(spider), "--split", "test", "-o", str(out)], capsys)


def test_relative_db_paths_end_to_end(shared_data: Path, spider_rows: dict[str, list[dict]], tmp_path: Path,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    """Prepare on one machine with --relative-to, train on another where the data is mounted elsewhere."""
    data = tmp_path / "prep" / "data"
    questions = spider_rows["concert_singer"][:3] + spider_rows["pets_1"][:3]
    spider = _spider_dir(data / "spider", shared_data, {"dev.json": questions}, {"database": ["concert_singer", "pets_1"]})
    out = tmp_path / "dev.parquet"
    assert ds.main([str(spider), "--build-db-dir", str(data / "built"), "--relative-to", str(data), "-o", str(out)]) == 0
    df = pd.read_parquet(out)
    paths = [e["db_path"] for e in df["extra_info"]]
    assert paths == ["built/concert_singer/concert_singer.sqlite"] * 3 + ["built/pets_1/pets_1.sqlite"] * 3

    # the cluster mounts the same files at another path; the preparing machine's copy is gone
    mount = tmp_path / "cluster" / "mnt" / "sqldata"
    shutil.copytree(data, mount)
    shutil.rmtree(tmp_path / "prep")
    _golds_score_one(df, db_root=str(mount))
    from omegaconf import OmegaConf
    from verl.trainer.ppo.reward import get_custom_reward_fn

    cfg = OmegaConf.create({"reward": {"custom_reward_function": {
        "path": "pkg://dyjr_verl.rewards.sql", "name": "compute_score", "reward_kwargs": {"db_root": str(mount)}}}})
    row = df.iloc[4]
    gold = row["reward_model"]["ground_truth"]
    fn = get_custom_reward_fn(cfg)
    assert fn(data_source="spider", solution_str=f"<answer>{gold}</answer>", ground_truth=gold,
              extra_info=dict(row["extra_info"]))["status"] == "correct"
    with pytest.raises(ValueError, match="is relative to a database root: pass reward kwarg db_root"):
        sr.compute_score("spider", f"<answer>{gold}</answer>", gold, dict(row["extra_info"]))

    # without --relative-to the paths stay absolute and need no root
    out_abs = tmp_path / "abs.parquet"
    assert ds.main([str(mount / "spider"), "--build-db-dir", str(mount / "built"), "-o", str(out_abs)]) == 0
    df_abs = pd.read_parquet(out_abs)
    assert all(Path(e["db_path"]).is_absolute() for e in df_abs["extra_info"])
    _golds_score_one(df_abs)

    # a database outside the --relative-to directory cannot be stored relative to it
    err = _cli_error([str(mount / "spider"), "--build-db-dir", str(mount / "built"), "--relative-to",
                      str(mount / "spider"), "-o", str(out)], capsys)
    assert "is not under --relative-to" in err
    assert "--relative-to" in _cli_error([str(mount / "spider"), "--build-db-dir", str(mount / "built"),
                                          "--relative-to", str(tmp_path / "nowhere"), "-o", str(out)], capsys)
