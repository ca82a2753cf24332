"""SQL reward: extraction, execution match on all Spider dev golds, the sandbox against hostile SQL.

The 10 Spider databases are built from ../shared/data/spider/database/<db>/schema.sql into a temporary
directory once per session (no .sqlite file is ever committed).
"""

from __future__ import annotations

import asyncio
import collections
import hashlib
import json
import os
import shutil
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dyjr_verl.rewards import sql as sr

TIMEOUT_S = 2.0
# progress-handler deadline, then the hard kill HARD_KILL_GRACE_S later, then worker replacement
BOUND_S = TIMEOUT_S + sr.HARD_KILL_GRACE_S + 2.0
RESULT_KEYS = {"score", "acc", "pred", "timeout", "status"}


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="session")
def spider_root(shared_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``<tmp>/<db_id>/<db_id>.sqlite`` for the 10 Spider dev databases."""
    root = tmp_path_factory.mktemp("spider_db")
    for schema in sorted((shared_data / "spider" / "database").glob("*/schema.sql")):
        db_id = schema.parent.name
        sr.build_spider_sqlite(schema, root / db_id / f"{db_id}.sqlite")
    assert len(list(root.glob("*/*.sqlite"))) == 10
    return root


@pytest.fixture(scope="session")
def spider_dev(shared_data: Path) -> list[dict]:
    with (shared_data / "spider" / "dev.jsonl").open(encoding="utf-8") as fh:
        rows = [json.loads(line) for line in fh if line.strip()]
    assert len(rows) == 461
    return rows


@pytest.fixture(scope="module", autouse=True)
def sql_pool():
    sr.configure_pool(max_workers=2)
    assert sr.get_pool().warm() == 2
    yield sr.get_pool()
    sr.configure_pool()


def _fence(sql: str) -> str:
    return f"Let me look at the schema.\n```sql\n{sql}\n```"


def _info(row: dict) -> dict:
    return {"db_id": row["db_id"]}


def _gold_rows(root: Path, row: dict) -> list[tuple]:
    conn = sqlite3.connect(root / row["db_id"] / f"{row['db_id']}.sqlite")
    try:
        return conn.execute(row["query"]).fetchall()
    finally:
        conn.close()


# --------------------------------------------------------------------------------------------------
# extraction


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("```sql\nSELECT 1\n```", "SELECT 1"),
        ("```sql\nSELECT 1\n```\nbetter:\n```sql\nSELECT 2;\n```", "SELECT 2"),
        ("```SQLite\nSELECT 3\n```", "SELECT 3"),
        ("```\nSELECT 4\n```", "SELECT 4"),
        ("```python\nprint(1)\n```", None),
        ("<think>```sql\nSELECT 0\n```</think><answer>```sql\nSELECT 5\n```</answer>", "SELECT 5"),
        ("<think>draft</think><solution>SELECT 6</solution>", "SELECT 6"),
        ("<answer>SELECT 7</answer> and <answer>SELECT 8</answer>", "SELECT 8"),
        ("The query is: SELECT name FROM singer WHERE age > 20;", "SELECT name FROM singer WHERE age > 20"),
        ("First we select names.\nSELECT a FROM t WHERE x IN (SELECT b FROM u)", "SELECT a FROM t WHERE x IN (SELECT b FROM u)"),
        ("Answer:\nWITH c AS (SELECT 1 AS x)\nSELECT x FROM c", "WITH c AS (SELECT 1 AS x)\nSELECT x FROM c"),
        ("SELECT a FROM t\nUNION\nSELECT b FROM u", "SELECT a FROM t\nUNION\nSELECT b FROM u"),
        ("Query:\nSELECT 1\n\nThat returns one row.", "SELECT 1"),
        ("Use `SELECT count(*) FROM singer` here.", "SELECT count(*) FROM singer"),
        ("SELECT name FROM singer\nThis returns every name.", "SELECT name FROM singer"),
        ("Query:\nSELECT name\nFROM singer\nWHERE age > 3\nThat's all.", "SELECT name\nFROM singer\nWHERE age > 3"),
        ("<answer>The query is:\nSELECT 9</answer>", "SELECT 9"),
        ("<answer>DROP TABLE t</answer>", "DROP TABLE t"),
        ("I cannot answer this.", None),
        ("", None),
        ("<answer></answer>", None),
    ],
)
def test_extract_sql(text: str, expected: str | None) -> None:
    assert sr.extract_sql(text) == expected


def test_extract_sql_is_linear_on_huge_inputs() -> None:
    start = time.monotonic()
    for text in ("<answer>" * 200_000, "```" * 300_000, "select " * 150_000, "(" * 1_000_000 + "SELECT 1"):
        sr.extract_sql(text)
    assert time.monotonic() - start < 5.0


# --------------------------------------------------------------------------------------------------
# comparison rules


def test_gold_is_ordered() -> None:
    assert sr.gold_is_ordered("SELECT a FROM t ORDER BY a DESC LIMIT 1")
    assert sr.gold_is_ordered("SELECT a FROM t UNION SELECT b FROM u ORDER BY 1")
    assert sr.gold_is_ordered("WITH x AS (SELECT 1) SELECT * FROM x ORDER BY 1")
    assert not sr.gold_is_ordered("SELECT a FROM (SELECT a FROM t ORDER BY a)")
    assert not sr.gold_is_ordered("SELECT count(*) FROM t WHERE a IN (SELECT a FROM u ORDER BY a LIMIT 1)")
    assert not sr.gold_is_ordered("SELECT 'ORDER BY' FROM t")


def test_results_match_rules() -> None:
    g = [(1, "a"), (2, "b"), (2, "b")]
    assert sr.results_match(g, [(2, "b"), (1, "a"), (2, "b")], ordered=False)
    assert not sr.results_match(g, [(2, "b"), (1, "a"), (2, "b")], ordered=True)
    assert not sr.results_match(g, [(1, "a"), (2, "b")], ordered=False)  # multiset, not set
    assert sr.results_match(g, [("a", 1), ("b", 2), ("b", 2)], ordered=True)  # column permutation
    assert not sr.results_match(g, [(1, "a", 0), (2, "b", 0), (2, "b", 0)], ordered=False)
    assert sr.results_match([(0.1 + 0.2,)], [(0.3,)], ordered=False)
    assert sr.results_match([(3,)], [(3.0,)], ordered=False)
    assert not sr.results_match([(3,)], [("3",)], ordered=False)
    assert sr.results_match([], [], ordered=True)
    assert not sr.results_match([(1, 1), (2, 2)], [(1, 2), (2, 1)], ordered=False)


# --------------------------------------------------------------------------------------------------
# all Spider dev golds


def test_every_spider_gold_scores_one_against_itself(spider_root: Path, spider_dev: list[dict]) -> None:
    sr.clear_gold_cache()
    golds = [r["query"] for r in spider_dev]
    infos = [_info(r) for r in spider_dev]
    out = sr.compute_score_batch(None, [_fence(g) for g in golds], golds, infos, db_root=str(spider_root))
    assert [o["status"] for o in out] == ["correct"] * 461
    assert all(o["score"] == sr.SCORE_CORRECT and o["acc"] is True for o in out)
    # the same via <answer> tags and bare text, now served from the gold cache
    before = sr.gold_cache_stats()["hits"]
    tagged = sr.compute_score_batch(None, [f"<answer>{g}</answer>" for g in golds], golds, infos, db_root=str(spider_root))
    assert all(o["status"] == "correct" for o in tagged)
    assert sr.gold_cache_stats()["hits"] - before == 461
    prose = [f"The tables are joined on their keys.\nQuery:\n{g}\nThis returns the requested rows." for g in golds]
    assert [sr.extract_sql(p) for p in prose] == [g.strip() for g in golds]
    bare = sr.compute_score_batch(None, prose, golds, infos, db_root=str(spider_root))
    assert all(o["status"] == "correct" for o in bare)


def test_every_spider_gold_scores_zero_against_a_perturbation(spider_root: Path, spider_dev: list[dict]) -> None:
    """Non-empty gold: ``LIMIT 0`` and a duplicated result are both wrong. Empty gold (14 of 461):
    another question's gold on the same database that returns rows is wrong."""
    results = {r["id"]: _gold_rows(spider_root, r) for r in spider_dev}
    by_db = collections.defaultdict(list)
    for r in spider_dev:
        if results[r["id"]]:
            by_db[r["db_id"]].append(r["query"])
    assert sum(1 for r in spider_dev if not results[r["id"]]) == 14
    limit0, doubled, golds, infos = [], [], [], []
    for r in spider_dev:
        g = r["query"]
        golds.append(g)
        infos.append(_info(r))
        if results[r["id"]]:
            limit0.append(f"SELECT * FROM ({g}) LIMIT 0")
            doubled.append(f"SELECT * FROM ({g}) UNION ALL SELECT * FROM ({g})")
        else:
            other = by_db[r["db_id"]][0]
            limit0.append(other)
            doubled.append(other)
    for preds in (limit0, doubled):
        out = sr.compute_score_batch(None, [_fence(p) for p in preds], golds, infos, db_root=str(spider_root))
        bad = [(g, o["status"]) for g, o in zip(golds, out) if o["status"] != "wrong"]
        assert bad == []
        assert all(o["score"] == sr.SCORE_WRONG for o in out)


def test_order_matters_only_with_top_level_order_by(spider_root: Path) -> None:
    info = {"db_id": "concert_singer"}
    root = str(spider_root)
    ordered = "SELECT Name FROM singer ORDER BY Age DESC"
    assert sr.compute_score(None, _fence(ordered), ordered, info, db_root=root)["status"] == "correct"
    assert sr.compute_score(None, _fence("SELECT Name FROM singer ORDER BY Age ASC"), ordered, info, db_root=root)["status"] == "wrong"
    unordered = "SELECT Name FROM singer"
    assert sr.compute_score(None, _fence("SELECT Name FROM singer ORDER BY Name DESC"), unordered, info, db_root=root)["status"] == "correct"
    swapped = sr.compute_score(None, _fence("SELECT Age, Name FROM singer"), "SELECT Name, Age FROM singer", info, db_root=root)
    assert swapped["status"] == "correct"


# --------------------------------------------------------------------------------------------------
# statuses, reward values, configuration errors


def test_status_values_and_result_shape(spider_root: Path) -> None:
    info = {"db_path": str(spider_root / "pets_1" / "pets_1.sqlite")}
    gold = "SELECT count(*) FROM Student"
    cases = {
        "correct": _fence("SELECT count(*) FROM Student"),
        "wrong": _fence("SELECT count(*) FROM Pets"),
        "exec_error": _fence("SELECT nope FROM Student"),
        "format_error": "I don't know.",
        "timeout": _fence("WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c) SELECT count(*) FROM c"),
    }
    expected_score = {"correct": 1.0, "wrong": 0.0, "exec_error": -0.5, "timeout": -0.5, "format_error": -1.0}
    for status, response in cases.items():
        out = sr.compute_score(data_source="spider", solution_str=response, ground_truth=gold, extra_info=info, timeout_s=1.0)
        assert set(out) == RESULT_KEYS
        assert out["status"] == status
        assert out["score"] == expected_score[status]
        assert out["timeout"] == (status == "timeout")
        assert out["acc"] == (status == "correct")
    assert sr.SCORE_FORMAT_ERROR < sr.SCORE_EXEC_ERROR < sr.SCORE_WRONG < sr.SCORE_CORRECT
    assert sr.SCORE_TIMEOUT == sr.SCORE_EXEC_ERROR


def test_gold_error_and_reward_overrides(spider_root: Path) -> None:
    info = {"db_path": str(spider_root / "pets_1" / "pets_1.sqlite")}
    out = sr.compute_score(None, _fence("SELECT 1"), "SELECT broken FROM nowhere", info)
    assert out["status"] == "gold_error" and out["score"] == sr.SCORE_GOLD_ERROR
    custom = sr.compute_score(None, "no sql", "SELECT 1", info, reward_values={"format_error": 0.0})
    assert custom["status"] == "format_error" and custom["score"] == 0.0
    with pytest.raises(ValueError, match="reward_values"):
        sr.compute_score(None, "no sql", "SELECT 1", info, reward_values={"bogus": 1})


def test_db_resolution(spider_root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    gold = "SELECT count(*) FROM singer"
    resp = _fence(gold)
    assert sr.compute_score(None, resp, gold, {"db_id": "concert_singer"}, db_root=str(spider_root))["score"] == 1.0
    assert sr.compute_score(None, resp, gold, {"db_id": "concert_singer", "db_root": str(spider_root)})["score"] == 1.0
    monkeypatch.setenv("DYJR_SQL_DB_ROOT", str(spider_root))
    assert sr.compute_score(None, resp, gold, {"db_id": "concert_singer"})["score"] == 1.0
    # a stale db_path falls back to db_id + root
    assert sr.compute_score(None, resp, gold, {"db_path": "/nonexistent/x.sqlite", "db_id": "concert_singer"})["score"] == 1.0
    monkeypatch.delenv("DYJR_SQL_DB_ROOT")
    with pytest.raises(ValueError, match="database root"):
        sr.compute_score(None, resp, gold, {"db_id": "concert_singer"})
    with pytest.raises(ValueError, match="not found"):
        sr.compute_score(None, resp, gold, {"db_id": "no_such_db"}, db_root=str(spider_root))
    with pytest.raises(ValueError, match="db_path"):
        sr.compute_score(None, resp, gold, {"db_path": "/nonexistent/x.sqlite"})
    with pytest.raises(ValueError, match="extra_info"):
        sr.compute_score(None, resp, gold, None)
    with pytest.raises(ValueError, match="ground_truth"):
        sr.compute_score(None, resp, "", {"db_id": "concert_singer"}, db_root=str(spider_root))
    with pytest.raises(ValueError, match="timeout_s"):
        sr.compute_score(None, resp, gold, {"db_id": "concert_singer"}, db_root=str(spider_root), timeout_s=-1)


def test_relative_db_path_resolves_against_db_root(spider_root: Path, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """A parquet made with ``data.sql --relative-to`` stores db_path relative to the data root, which each
    cluster mounts somewhere else; the layout need not be <db_id>/<db_id>.sqlite."""
    mount = tmp_path / "mnt" / "data"
    (mount / "dbs" / "v2").mkdir(parents=True)
    shutil.copy(spider_root / "concert_singer" / "concert_singer.sqlite", mount / "dbs" / "v2" / "singers.sqlite")
    gold = "SELECT count(*) FROM singer"
    info = {"db_path": "dbs/v2/singers.sqlite", "db_id": "concert_singer"}
    monkeypatch.chdir(tmp_path)  # nothing is looked up relative to the working directory
    assert sr.compute_score(None, _fence(gold), gold, info, db_root=str(mount))["status"] == "correct"
    assert sr.compute_score_batch(None, [_fence("SELECT 1")], [gold], [info], db_root=str(mount))[0]["status"] == "wrong"
    assert sr.resolve_db_path(info, mount) == str(mount / "dbs" / "v2" / "singers.sqlite")
    monkeypatch.setenv("DYJR_SQL_DB_ROOT", str(mount))
    assert sr.compute_score(None, _fence(gold), gold, info)["status"] == "correct"
    monkeypatch.delenv("DYJR_SQL_DB_ROOT")
    with pytest.raises(ValueError, match=r"db_path 'dbs/v2/singers.sqlite' is relative to a database root: pass reward kwarg db_root"):
        sr.compute_score(None, _fence(gold), gold, info)
    with pytest.raises(ValueError, match="database not found: neither"):
        sr.compute_score(None, _fence(gold), gold, info, db_root=str(tmp_path))
    # an absolute db_path keeps working, with or without a root
    absolute = {"db_path": str(mount / "dbs" / "v2" / "singers.sqlite")}
    assert sr.compute_score(None, _fence(gold), gold, absolute)["status"] == "correct"
    assert sr.compute_score(None, _fence(gold), gold, absolute, db_root=str(tmp_path))["status"] == "correct"


def test_unknown_reward_kwargs_are_refused(spider_root: Path) -> None:
    """A misspelt key (db-root, timeout) used to be swallowed by **kwargs: the run scored against defaults."""
    gold = "SELECT count(*) FROM singer"
    info = {"db_id": "concert_singer"}
    accepted = "db_root, gold_cache, gold_timeout_s, max_rows, reward_values, soft_deadline, timeout_s"
    with pytest.raises(ValueError, match=rf"unknown reward_kwargs key\(s\) dbroot; accepted: {accepted}$"):
        sr.compute_score(None, _fence(gold), gold, info, dbroot=str(spider_root))
    with pytest.raises(ValueError, match="extract, timeout"):
        sr.compute_score_batch(None, [_fence(gold)], [gold], [info], db_root=str(spider_root), timeout=1, extract="x")
    with pytest.raises(ValueError, match="unknown reward_kwargs"):
        asyncio.run(sr.compute_score_async(None, _fence(gold), gold, info, db_root=str(spider_root), fast_path=True))
    out = sr.compute_score(None, _fence(gold), gold, info, db_root=str(spider_root), reward_router_address=None,
                           reward_model_tokenizer=None)  # added by verl's reward managers, not options
    assert out["status"] == "correct"
    from omegaconf import OmegaConf
    from verl.trainer.ppo.reward import get_custom_reward_fn

    cfg = OmegaConf.create({"reward": {"custom_reward_function": {
        "path": "pkg://dyjr_verl.rewards.sql", "name": "compute_score",
        "reward_kwargs": {"db_root": str(spider_root), "timeout": 3}}}})
    with pytest.raises(ValueError, match="unknown reward_kwargs key.*timeout;"):
        get_custom_reward_fn(cfg)(data_source="spider", solution_str=_fence(gold), ground_truth=gold, extra_info=info)


def test_script_without_main_guard_fails_fast(tmp_path: Path, repo_root: Path) -> None:
    """Its worker processes re-run the script; before, the call hung until an outside timeout killed it."""
    db = tmp_path / "tiny.sqlite"
    conn = sqlite3.connect(db)
    conn.executescript("CREATE TABLE t (x INTEGER); INSERT INTO t VALUES (1), (2);")
    conn.close()
    call = f"""compute_score(None, "```sql\\nSELECT sum(x) FROM t\\n```", "SELECT 3", {{"db_path": {str(db)!r}}})"""
    (tmp_path / "plain.py").write_text(f"from dyjr_verl.rewards.sql import compute_score\nprint({call}['status'])\n")
    (tmp_path / "guarded.py").write_text(
        f"from dyjr_verl.rewards.sql import compute_score\nif __name__ == '__main__':\n    print({call}['status'])\n")
    env = {**os.environ, "PYTHONPATH": str(repo_root)}
    start = time.monotonic()
    proc = subprocess.run([sys.executable, str(tmp_path / "plain.py")], capture_output=True, text=True, env=env,
                          cwd=tmp_path, timeout=120)
    assert time.monotonic() - start < 60
    assert proc.returncode != 0
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("dyjr_verl.rewards.deadline.PoolStartError: reward called at the top level of")
    assert 'if __name__ == "__main__":' in last
    proc = subprocess.run([sys.executable, str(tmp_path / "guarded.py")], capture_output=True, text=True, env=env,
                          cwd=tmp_path, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "correct"


def test_gold_cache_follows_the_database_file(spider_root: Path, tmp_path: Path) -> None:
    db = tmp_path / "copy.sqlite"
    shutil.copy(spider_root / "concert_singer" / "concert_singer.sqlite", db)
    gold = "SELECT count(*) FROM singer"
    info = {"db_path": str(db)}
    sr.clear_gold_cache()
    assert sr.compute_score(None, _fence("SELECT 6"), gold, info)["status"] == "correct"
    assert sr.compute_score(None, _fence("SELECT 6"), gold, info)["status"] == "correct"
    assert sr.gold_cache_stats() == {"hits": 1, "misses": 1, "size": 1}
    conn = sqlite3.connect(db)
    conn.execute("DELETE FROM singer WHERE Singer_ID = 1")
    conn.commit()
    conn.close()
    os.utime(db, ns=(time.time_ns() + 10**9, time.time_ns() + 10**9))
    assert sr.compute_score(None, _fence("SELECT 5"), gold, info)["status"] == "correct"
    assert sr.compute_score(None, _fence("SELECT 6"), gold, info)["status"] == "wrong"


def test_row_cap(spider_root: Path) -> None:
    info = {"db_id": "concert_singer"}
    gold = "SELECT Name FROM singer"
    out = sr.compute_score(None, _fence(gold), gold, info, db_root=str(spider_root), max_rows=3)
    assert out["status"] == "gold_error"  # the gold itself has 6 rows
    out = sr.compute_score(None, _fence("SELECT a.Name FROM singer a, singer b"), "SELECT Name FROM singer LIMIT 2", info,
                           db_root=str(spider_root), max_rows=3)
    assert out["status"] == "wrong"


def test_async_and_threads(spider_root: Path) -> None:
    from concurrent.futures import ThreadPoolExecutor

    root = str(spider_root)
    gold = "SELECT count(*) FROM singer"
    info = {"db_id": "concert_singer"}
    assert asyncio.iscoroutinefunction(sr.compute_score_async)
    out = asyncio.run(sr.compute_score_async(data_source="spider", solution_str=_fence(gold), ground_truth=gold,
                                             extra_info=info, db_root=root))
    assert out["status"] == "correct"
    responses = [_fence(gold), _fence("SELECT 1"), "nothing", _fence("DROP TABLE singer")] * 10
    with ThreadPoolExecutor(8) as ex:
        outs = list(ex.map(lambda r: sr.compute_score(None, r, gold, info, db_root=root)["status"], responses))
    assert outs == ["correct", "wrong", "format_error", "exec_error"] * 10


# --------------------------------------------------------------------------------------------------
# hostile SQL: never correct, bounded time, database bytes unchanged

HOSTILE = {
    "drop_table": "DROP TABLE singer",
    "insert": "INSERT INTO singer (Singer_ID, Name) VALUES (99, 'x')",
    "update": "UPDATE singer SET Age = 1",
    "delete": "DELETE FROM singer",
    "replace": "REPLACE INTO singer (Singer_ID) VALUES (1)",
    "create_table": "CREATE TABLE evil (x)",
    "create_temp_table": "CREATE TEMP TABLE evil (x)",
    "create_index": "CREATE INDEX ix ON singer (Age)",
    "create_view": "CREATE VIEW v AS SELECT 1",
    "create_trigger": "CREATE TRIGGER tr AFTER INSERT ON singer BEGIN SELECT 1; END",
    "alter_table": "ALTER TABLE singer ADD COLUMN x",
    "attach_file": "ATTACH DATABASE '{tmp}/evil.db' AS evil",
    "attach_memory": "ATTACH ':memory:' AS m",
    "detach_main": "DETACH DATABASE main",
    "pragma_writable_schema": "PRAGMA writable_schema = 1",
    "pragma_journal_wal": "PRAGMA journal_mode = WAL",
    "pragma_journal_delete": "PRAGMA journal_mode = DELETE",
    "pragma_query_only_off": "PRAGMA query_only = OFF",
    "pragma_user_version": "PRAGMA user_version = 7",
    "pragma_table_function": "SELECT * FROM pragma_table_info('singer')",
    "load_extension": "SELECT load_extension('{tmp}/evil.so')",
    "fts3_tokenizer_pointer_leak": "SELECT fts3_tokenizer('simple')",
    "vacuum": "VACUUM",
    "vacuum_into": "VACUUM INTO '{tmp}/copy.db'",
    "reindex": "REINDEX",
    "analyze": "ANALYZE",
    "begin": "BEGIN IMMEDIATE",
    "savepoint": "SAVEPOINT s1",
    "select_then_drop": "SELECT 1; DROP TABLE singer",
    "select_then_delete": "SELECT count(*) FROM singer; DELETE FROM singer",
    "endless_recursive_cte": "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c) SELECT count(*) FROM c",
    "endless_recursive_rows": "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c) SELECT x FROM c",
    "huge_cross_join_count": "SELECT count(*) FROM singer a, singer b, singer c, singer d, singer e, singer f, "
    "singer g, singer h, singer i, singer j, singer k, singer l",
    "huge_cross_join_sorted": "SELECT a.Name FROM singer a, singer b, singer c, singer d, singer e, singer f, "
    "singer g ORDER BY random()",
    "giant_printf": "SELECT printf('%.*c', 1000000000, 'x')",
    "giant_zeroblob": "SELECT zeroblob(2000000000)",
    "giant_randomblob": "SELECT randomblob(100000000)",
    "doubling_string": "WITH RECURSIVE c(s) AS (SELECT 'x' UNION ALL SELECT s || s FROM c) SELECT length(s) FROM c",
    "long_group_concat": "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c WHERE x < 100000000) "
    "SELECT group_concat(x) FROM c",
    "deep_parentheses": "SELECT " + "(" * 5000 + "1" + ")" * 5000,
    "many_unions": "SELECT 1 " + "UNION ALL SELECT 1 " * 2000,
    "huge_statement": "SELECT '" + "x" * 200_000 + "'",
    "schema_dump": "SELECT * FROM sqlite_master",
    "missing_table": "SELECT * FROM nonexistent_table",
    "syntax_error": "SELEC Name FROM singer",
    "null_bytes": "SELECT 1\x00; DROP TABLE singer",
}
HOSTILE_GOLD = "SELECT count(*) FROM singer"


@pytest.fixture(scope="module")
def hostile_db(spider_root: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str, Path]:
    directory = tmp_path_factory.mktemp("hostile")
    db = directory / "concert_singer.sqlite"
    shutil.copy(spider_root / "concert_singer" / "concert_singer.sqlite", db)
    side = tmp_path_factory.mktemp("hostile_side")
    return db, _sha256(db), side


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_hostile_sql_is_contained(name: str, hostile_db: tuple[Path, str, Path]) -> None:
    db, digest, side = hostile_db
    sql = HOSTILE[name].replace("{tmp}", str(side))
    start = time.monotonic()
    out = sr.compute_score("spider", _fence(sql), HOSTILE_GOLD, {"db_path": str(db)}, timeout_s=TIMEOUT_S)
    elapsed = time.monotonic() - start
    assert elapsed < BOUND_S, f"{name} took {elapsed:.2f} s"
    assert out["status"] != "correct" and out["score"] < sr.SCORE_CORRECT and out["acc"] is False
    assert set(out) == RESULT_KEYS
    assert _sha256(db) == digest, f"{name} changed the database"
    assert sorted(p.name for p in db.parent.iterdir()) == [db.name]  # no -wal/-journal/-shm files
    assert list(side.iterdir()) == []  # nothing attached, vacuumed or loaded from there
    # the pool still works
    assert sr.compute_score("spider", _fence(HOSTILE_GOLD), HOSTILE_GOLD, {"db_path": str(db)})["status"] == "correct"


def test_writes_are_rejected_not_just_rolled_back(hostile_db: tuple[Path, str, Path]) -> None:
    db, _, _ = hostile_db
    for name in ("drop_table", "delete", "pragma_writable_schema", "attach_memory", "vacuum", "load_extension"):
        out = sr.compute_score("spider", _fence(HOSTILE[name]), HOSTILE_GOLD, {"db_path": str(db)})
        assert out["status"] == "exec_error", name


def test_hard_kill_when_the_progress_handler_cannot_fire(hostile_db: tuple[Path, str, Path]) -> None:
    """printf runs inside one VM instruction, so only the process kill can stop it."""
    db, digest, _ = hostile_db
    pool = sr.get_pool()
    killed = pool.stats.timed_out
    start = time.monotonic()
    out = sr.compute_score("spider", _fence(HOSTILE["giant_printf"]), HOSTILE_GOLD, {"db_path": str(db)}, timeout_s=1.0)
    assert time.monotonic() - start < 1.0 + sr.HARD_KILL_GRACE_S + 2.0
    assert out["status"] == "timeout" and out["timeout"] is True
    assert pool.stats.timed_out == killed + 1
    # without the soft deadline, an endless CTE is also stopped by the kill
    out = sr.compute_score("spider", _fence(HOSTILE["endless_recursive_cte"]), HOSTILE_GOLD, {"db_path": str(db)},
                           timeout_s=1.0, soft_deadline=False)
    assert out["status"] == "timeout"
    assert _sha256(db) == digest
    assert sr.compute_score("spider", _fence(HOSTILE_GOLD), HOSTILE_GOLD, {"db_path": str(db)})["status"] == "correct"


def test_open_readonly_connection_is_sandboxed(spider_root: Path) -> None:
    conn = sr.open_readonly(spider_root / "pets_1" / "pets_1.sqlite")
    try:
        assert conn.execute("SELECT count(*) FROM Student").fetchone()[0] > 0
        for stmt in ("DELETE FROM Student", "PRAGMA query_only = OFF", "ATTACH ':memory:' AS m"):
            with pytest.raises(sqlite3.DatabaseError):
                conn.execute(stmt)
    finally:
        conn.close()


# --------------------------------------------------------------------------------------------------
# prompt builder and database builder


def test_build_sql_prompt(spider_root: Path) -> None:
    db = spider_root / "concert_singer" / "concert_singer.sqlite"
    prompt = sr.build_sql_prompt(db, "How many singers do we have?")
    for table in ("stadium", "singer", "concert", "singer_in_concert"):
        assert f'CREATE TABLE "{table}"' in prompt
    assert "Question: How many singers do we have?" in prompt and "```sql" in prompt
    assert "example row" not in prompt
    with_rows = sr.build_sql_prompt(db, "q", sample_rows=2, evidence="age is in years")
    assert "2 example rows from singer" in with_rows and "Joe Sharp" in with_rows
    assert "External knowledge: age is in years" in with_rows
    with pytest.raises(ValueError, match="question"):
        sr.build_sql_prompt(db, "  ")
    with pytest.raises(ValueError, match="not found"):
        sr.build_sql_prompt(spider_root / "missing.sqlite", "q")


def test_build_sql_prompt_on_every_spider_db(spider_root: Path, shared_data: Path) -> None:
    tables = json.loads((shared_data / "spider" / "tables.json").read_text())
    for entry in tables:
        prompt = sr.build_sql_prompt(spider_root / entry["db_id"] / f"{entry['db_id']}.sqlite", "q", sample_rows=1)
        for name in entry["table_names_original"]:
            assert name.lower() in prompt.lower(), (entry["db_id"], name)


def test_build_spider_sqlite(shared_data: Path, tmp_path: Path) -> None:
    out = sr.build_spider_sqlite(shared_data / "spider" / "database" / "poker_player" / "schema.sql", tmp_path / "p" / "p.sqlite")
    conn = sqlite3.connect(out)
    assert conn.execute("SELECT count(*) FROM poker_player").fetchone()[0] > 0
    conn.close()
    sr.build_spider_sqlite(shared_data / "spider" / "database" / "poker_player" / "schema.sql", out)  # overwrite is fine
    with pytest.raises(ValueError, match="schema file not found"):
        sr.build_spider_sqlite(tmp_path / "nope.sql", tmp_path / "x.sqlite")
    bad = tmp_path / "bad.sql"
    bad.write_text("CREATE TABLE t (;")
    with pytest.raises(ValueError, match="bad.sql"):
        sr.build_spider_sqlite(bad, tmp_path / "bad.sqlite")
    assert not (tmp_path / "bad.sqlite").exists()


def test_invalid_utf8_text_does_not_break_gold_or_prediction(tmp_path: Path) -> None:
    db = tmp_path / "u.sqlite"
    conn = sqlite3.connect(db)
    conn.execute("CREATE TABLE t (x TEXT)")
    conn.execute("INSERT INTO t VALUES (CAST(x'ff41' AS TEXT))")
    conn.commit()
    conn.close()
    info = {"db_path": str(db)}
    assert sr.compute_score(None, _fence("SELECT x FROM t"), "SELECT x FROM t", info)["status"] == "correct"
    assert sr.compute_score(None, _fence("SELECT 'A'"), "SELECT x FROM t", info)["status"] == "wrong"


def test_loads_through_verls_custom_reward_loader(spider_root: Path) -> None:
    from omegaconf import OmegaConf
    from verl.trainer.ppo.reward import get_custom_reward_fn

    cfg = OmegaConf.create({"reward": {"custom_reward_function": {
        "path": "pkg://dyjr_verl.rewards.sql", "name": "compute_score", "reward_kwargs": {"db_root": str(spider_root)}}}})
    fn = get_custom_reward_fn(cfg)
    gold = "SELECT count(*) FROM singer"
    out = fn(data_source="spider", solution_str=_fence(gold), ground_truth=gold,
             extra_info={"db_id": "concert_singer", "num_turns": 1, "rollout_reward_scores": {}})
    assert out["status"] == "correct" and set(out) == RESULT_KEYS


def test_works_when_verl_loads_the_file_by_path(spider_root: Path, repo_root: Path) -> None:
    from verl.utils.import_utils import load_extern_object

    fn = load_extern_object(module_path=str(repo_root / "dyjr_verl" / "rewards" / "sql.py"), object_name="compute_score")
    assert fn.__module__.startswith("custom_module")
    gold = "SELECT count(*) FROM singer"
    assert fn("spider", _fence(gold), gold, {"db_id": "concert_singer"}, db_root=str(spider_root))["status"] == "correct"
