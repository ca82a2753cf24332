"""Text-to-SQL execution-match reward for verl, with a sandbox that cannot change the database.

verl contract: ``compute_score(data_source, solution_str, ground_truth, extra_info=None, **kwargs)``
with ``ground_truth`` = the gold SQL and ``extra_info`` carrying ``db_path`` (a SQLite file, absolute or
relative to the database root) or ``db_id`` (layout ``<root>/<db_id>/<db_id>.sqlite``); the database root
comes from the kwarg ``db_root``, ``extra_info["db_root"]`` or env ``DYJR_SQL_DB_ROOT``, so that a cluster
can mount the data anywhere (see :func:`resolve_db_path`). The returned dict always has the keys
``score``, ``acc``, ``pred``, ``timeout``, ``status`` (verl stacks them per key):

=============  =====================================  ================================
status         meaning                                score
=============  =====================================  ================================
format_error   no SQL found in the response            :data:`SCORE_FORMAT_ERROR` = -1.0
exec_error     the SQL fails (syntax, denied, limits)  :data:`SCORE_EXEC_ERROR` = -0.5
timeout        the SQL ran past the deadline           :data:`SCORE_TIMEOUT` = -0.5
wrong          runs, result differs from the gold's    :data:`SCORE_WRONG` = 0.0
correct        same result as the gold                 :data:`SCORE_CORRECT` = 1.0
gold_error     the *gold* SQL fails (a data problem)   :data:`SCORE_GOLD_ERROR` = 0.0
=============  =====================================  ================================

Results match when they are equal as multisets of rows (a list when the gold has a top-level
``ORDER BY``, decided with sqlglot), allowing a permutation of the columns (Spider's execution-match
convention); floats are compared to 10 significant digits.

Sandbox (none of the surveyed SQL rewards has more than BEGIN/ROLLBACK; see docs/rewards.md):

* the file is opened ``file:...?mode=ro&immutable=1`` (no writes, no locks, no -wal/-journal files),
  ``PRAGMA query_only=ON``, ``SQLITE_LIMIT_ATTACHED=0``, capped string/blob and SQL lengths, and a
  capped SQLite heap;
* an authorizer allows only SELECT, reads, recursive CTEs and a function list without
  ``load_extension``/``fts3_tokenizer``; every write, DDL, ATTACH/DETACH, PRAGMA, VACUUM,
  transaction, REINDEX and ANALYZE is denied;
* a progress handler interrupts the query at the deadline, and the query runs in a
  :class:`~dyjr_verl.rewards.deadline.DeadlinePool` worker that is SIGKILLed shortly after it
  (memory blow-ups, C-level stalls); at most ``max_rows`` rows are fetched.

Gold results are cached in the calling process per (database path, mtime, size, gold SQL).
"""

from __future__ import annotations

import collections
import functools
import os
import re
import sqlite3
import tempfile
import threading
import time
import urllib.parse
from pathlib import Path
from typing import Any, NamedTuple, Sequence

from dyjr_verl.rewards import bool_option, check_kwargs
from dyjr_verl.rewards.deadline import (
    DeadlineExceeded,
    DeadlinePool,
    LazyPool,
    PoolStartError,
    by_reference,
)

__all__ = [
    "SCORE_CORRECT",
    "SCORE_WRONG",
    "SCORE_EXEC_ERROR",
    "SCORE_TIMEOUT",
    "SCORE_FORMAT_ERROR",
    "SCORE_GOLD_ERROR",
    "STATUSES",
    "DEFAULT_TIMEOUT_S",
    "DEFAULT_MAX_ROWS",
    "compute_score",
    "compute_score_batch",
    "compute_score_async",
    "extract_sql",
    "gold_is_ordered",
    "results_match",
    "resolve_db_path",
    "build_sql_prompt",
    "describe_schema",
    "build_spider_sqlite",
    "open_readonly",
    "get_pool",
    "configure_pool",
    "clear_gold_cache",
    "gold_cache_stats",
]

SCORE_CORRECT = 1.0
SCORE_WRONG = 0.0
SCORE_EXEC_ERROR = -0.5
SCORE_TIMEOUT = -0.5
SCORE_FORMAT_ERROR = -1.0
SCORE_GOLD_ERROR = 0.0
STATUSES = ("format_error", "exec_error", "timeout", "wrong", "correct", "gold_error")
_DEFAULT_SCORES = {
    "correct": SCORE_CORRECT,
    "wrong": SCORE_WRONG,
    "exec_error": SCORE_EXEC_ERROR,
    "timeout": SCORE_TIMEOUT,
    "format_error": SCORE_FORMAT_ERROR,
    "gold_error": SCORE_GOLD_ERROR,
}

DEFAULT_TIMEOUT_S = 5.0
#: Gold queries may be slower than predictions should be; their errors (and timeouts) are cached.
DEFAULT_GOLD_TIMEOUT_S = 30.0
#: Extra wall-clock time after the progress-handler deadline before the worker is killed.
HARD_KILL_GRACE_S = 1.0
DEFAULT_MAX_ROWS = 10_000
MAX_SQL_CHARS = 100_000
MAX_VALUE_BYTES = 1 << 22  # SQLITE_LIMIT_LENGTH: 4 MiB strings/blobs
SQLITE_HEAP_LIMIT = 256 << 20  # PRAGMA hard_heap_limit per worker process
WORKER_MEMORY_LIMIT_MB = 1024
MAX_PRED_CHARS = 500
GOLD_CACHE_SIZE = 8192
#: Functions an authorizer-approved query may still not call.
DENIED_FUNCTIONS = frozenset({"load_extension", "fts3_tokenizer", "readfile", "writefile", "edit"})

# --------------------------------------------------------------------------------------------------
# extraction

_TAGS = ("answer", "solution")
_KEYWORD_RE = re.compile(r"(?i)\b(?:select|with)\b")
_MAX_STATEMENT_TRIES = 32


def _last_tag(text: str) -> str | None:
    """Content of the last complete ``<answer>``/``<solution>`` element (linear-time, via rfind)."""
    low = text.lower()
    best: tuple[int, str] | None = None
    for tag in _TAGS:
        close = low.rfind(f"</{tag}>")
        if close < 0:
            continue
        open_ = low.rfind(f"<{tag}>", 0, close)
        if open_ < 0:
            continue
        if best is None or close > best[0]:
            best = (close, text[open_ + len(tag) + 2 : close])
    return None if best is None else best[1]


def _last_fence(text: str) -> str | None:
    """Body of the last ```` ```sql ```` (or ```` ```sqlite ````/bare) fenced block."""
    marks = []
    i = text.find("```")
    while i >= 0:
        marks.append(i)
        i = text.find("```", i + 3)
    best = None
    for open_, close in zip(marks[0::2], marks[1::2]):
        header_end = text.find("\n", open_ + 3, close)
        if header_end < 0:
            continue  # ```SELECT 1``` on one line: treated below as a bare statement
        lang = text[open_ + 3 : header_end].strip().lower()
        if lang in ("sql", "sqlite", ""):
            best = text[header_end + 1 : close]
    return best


def _statement_end(text: str, start: int) -> int | None:
    """End of the statement starting at ``start``: a top-level ``;``, a backtick, a blank line or the end.

    ``None`` when a ``)`` closes a parenthesis opened before ``start`` (``start`` is a subquery).
    """
    depth, i, n = 0, start, len(text)
    quote = ""
    while i < n:
        c = text[i]
        if quote:
            if c == quote:
                quote = ""
        elif c in "'\"":
            quote = c
        elif c == "[":
            quote = "]"
        elif c == "(":
            depth += 1
        elif c == ")":
            depth -= 1
            if depth < 0:
                return None
        elif depth == 0 and c in ";`":
            return i
        elif depth == 0 and c == "\n":
            j = i + 1
            while j < n and text[j] in " \t\r":
                j += 1
            if j >= n or text[j] == "\n":
                return i
        i += 1
    return n


_CONTINUATION_WORDS = ("union", "all", "intersect", "except", "as", "in", "exists", "from", "join", "not")


def _is_statement_start(text: str, pos: int) -> bool:
    """A SELECT/WITH that begins a statement: at the text/line start or after ``:``, ``;`` or a backtick,
    and not continuing one (after ``(``, ``,``, ``)`` or UNION/INTERSECT/EXCEPT/...)."""
    k = pos - 1
    while k >= 0 and text[k] in " \t\r":
        k -= 1
    if k < 0 or text[k] in ":;`>":
        return True
    if text[k] != "\n":
        return False
    while k >= 0 and text[k] in " \t\r\n":
        k -= 1
    if k < 0:
        return True
    if text[k] in "(,)":
        return False
    word_start = k
    while word_start > 0 and text[word_start - 1].isalpha():
        word_start -= 1
    return text[word_start : k + 1].lower() not in _CONTINUATION_WORDS


_WITH_CTE_RE = re.compile(r"(?i)with\s+(?:recursive\s+)?(?:\w+|\"[^\"]*\"|\[[^\]]*\])\s*(?:\([^()]*\)\s*)?as\s*\(")


def _last_statement(text: str) -> str | None:
    """The last top-level ``SELECT``/``WITH <cte> AS (`` statement in free text."""
    starts = [m.start() for m in _KEYWORD_RE.finditer(text)]
    tries = 0
    for start in reversed(starts):
        if tries >= _MAX_STATEMENT_TRIES:
            break
        if not _is_statement_start(text, start):
            continue
        if text[start] in "wW" and not _WITH_CTE_RE.match(text, start):
            continue
        tries += 1
        end = _statement_end(text, start)
        if end is not None:
            return _trim_trailing_prose(text[start:end])
    return None


def _parses(sql: str) -> bool:
    import sqlglot
    from sqlglot.errors import SqlglotError

    try:
        return sqlglot.parse_one(sql, read="sqlite") is not None
    except (SqlglotError, ValueError, RecursionError):
        return False


def _trim_trailing_prose(stmt: str, max_lines: int = 40) -> str:
    """Drop trailing lines of prose after a bare statement ("SELECT ...\nThis returns ..."): the longest
    line prefix that sqlglot parses; the statement unchanged if none does (SQLite then reports the error)."""
    lines = stmt.rstrip().split("\n")
    if len(lines) == 1 or len(lines) > max_lines or _parses(stmt):
        return stmt
    for k in range(len(lines) - 1, 0, -1):
        prefix = "\n".join(lines[:k])
        if _parses(prefix):
            return prefix
    return stmt


_SQL_START_RE = re.compile(r"(?i)\s*(?:select|with|insert|update|delete|replace|create|drop|alter|attach|detach|"
                           r"pragma|vacuum|reindex|analyze|begin|savepoint|explain|values)\b")


def _clean_sql(sql: str) -> str:
    sql = sql.strip()
    while sql.endswith(";"):
        sql = sql[:-1].rstrip()
    return sql


def extract_sql(text: str) -> str | None:
    """The predicted SQL: last ``<answer>``/``<solution>`` element (a fenced block inside it wins, prose
    around a bare query is dropped), else the last ```` ```sql ```` block, else the last top-level
    SELECT/WITH statement in the text (trailing prose lines trimmed with sqlglot); ``None`` if none."""
    if not text:
        return None
    tagged = _last_tag(text)
    if tagged is not None:
        inner = _last_fence(tagged)
        if inner is None and not _SQL_START_RE.match(tagged):  # prose around a bare query
            inner = _last_statement(tagged)
        sql = _clean_sql(inner if inner is not None else tagged)
        return sql or None
    fenced = _last_fence(text)
    if fenced is not None:
        sql = _clean_sql(fenced)
        return sql or None
    stmt = _last_statement(text)
    if stmt is not None:
        sql = _clean_sql(stmt)
        return sql or None
    return None


# --------------------------------------------------------------------------------------------------
# sandboxed execution (worker side)


def _authorizer(action: int, arg1: str | None, arg2: str | None, db: str | None, trigger: str | None) -> int:
    if action in (sqlite3.SQLITE_SELECT, sqlite3.SQLITE_READ, sqlite3.SQLITE_RECURSIVE):
        return sqlite3.SQLITE_OK
    if action == sqlite3.SQLITE_FUNCTION:
        return sqlite3.SQLITE_DENY if (arg2 or "").lower() in DENIED_FUNCTIONS else sqlite3.SQLITE_OK
    return sqlite3.SQLITE_DENY


def _ro_uri(db_path: str) -> str:
    return "file:" + urllib.parse.quote(os.path.abspath(db_path)) + "?mode=ro&immutable=1"


def open_readonly(db_path: str | os.PathLike[str]) -> sqlite3.Connection:
    """A sandboxed connection: read-only immutable URI, query_only, limits and the authorizer."""
    conn = sqlite3.connect(_ro_uri(os.fspath(db_path)), uri=True, isolation_level=None, check_same_thread=False)
    conn.execute("PRAGMA query_only=ON")
    conn.setlimit(sqlite3.SQLITE_LIMIT_ATTACHED, 0)
    conn.setlimit(sqlite3.SQLITE_LIMIT_LENGTH, MAX_VALUE_BYTES)
    conn.setlimit(sqlite3.SQLITE_LIMIT_SQL_LENGTH, MAX_SQL_CHARS)
    conn.set_authorizer(_authorizer)
    # Invalid UTF-8 in a TEXT value would otherwise fail the whole query (gold included).
    conn.text_factory = lambda b: b.decode("utf-8", "replace")
    return conn


_worker_conns: "collections.OrderedDict[str, tuple[tuple[int, int], sqlite3.Connection]]" = collections.OrderedDict()


def _worker_init() -> None:
    """Pool initializer: cap SQLite's heap for the whole worker process."""
    conn = sqlite3.connect(":memory:")
    conn.execute(f"PRAGMA hard_heap_limit={SQLITE_HEAP_LIMIT}")
    conn.close()


def _worker_conn(db_path: str) -> sqlite3.Connection:
    st = os.stat(db_path)
    stamp = (st.st_mtime_ns, st.st_size)
    hit = _worker_conns.get(db_path)
    if hit is not None and hit[0] == stamp:
        _worker_conns.move_to_end(db_path)
        return hit[1]
    if hit is not None:
        hit[1].close()
    conn = open_readonly(db_path)
    _worker_conns[db_path] = (stamp, conn)
    while len(_worker_conns) > 64:
        _, (_, old) = _worker_conns.popitem(last=False)
        old.close()
    return conn


def _execute_in_worker(db_path: str, sql: str, max_rows: int, soft_timeout_s: float | None) -> tuple[Any, ...]:
    """``("ok", ncols, rows, truncated)`` | ``("error", message)`` | ``("timeout", message)``."""
    try:
        conn = _worker_conn(db_path)
    except (OSError, sqlite3.Error) as exc:
        return ("error", f"cannot open database: {exc}")
    deadline = time.monotonic() + soft_timeout_s if soft_timeout_s else None
    timed_out = False

    def progress() -> int:
        nonlocal timed_out
        if deadline is not None and time.monotonic() > deadline:
            timed_out = True
            return 1
        return 0

    conn.set_progress_handler(progress, 1000)
    cur = None
    try:
        cur = conn.execute(sql)
        ncols = len(cur.description or ())
        rows = cur.fetchmany(max_rows + 1)
        truncated = len(rows) > max_rows
        return ("ok", ncols, [tuple(r) for r in rows[:max_rows]], truncated)
    except (sqlite3.Error, ValueError, OverflowError, MemoryError, RecursionError) as exc:
        if timed_out:
            return ("timeout", f"interrupted after {soft_timeout_s:g} s")
        return ("error", f"{type(exc).__name__}: {exc}"[:500])
    finally:
        if cur is not None:
            try:
                cur.close()
            except sqlite3.Error:
                pass
        conn.set_progress_handler(None, 0)


# --------------------------------------------------------------------------------------------------
# comparison


def gold_is_ordered(sql: str) -> bool:
    """True when the query has a top-level ORDER BY (its row order is then part of the answer)."""
    import sqlglot
    from sqlglot.errors import SqlglotError

    try:
        tree = sqlglot.parse_one(sql, read="sqlite")
    except (SqlglotError, ValueError, RecursionError):
        tree = None
    if tree is not None:
        return tree.args.get("order") is not None
    # sqlglot could not parse it: look for ORDER BY outside parentheses and quotes.
    depth, quote = 0, ""
    upper = sql.upper()
    for i, c in enumerate(upper):
        if quote:
            quote = "" if c == quote else quote
        elif c in "'\"`":
            quote = c
        elif c == "(":
            depth += 1
        elif c == ")":
            depth -= 1
        elif depth == 0 and upper.startswith("ORDER", i) and re.match(r"ORDER\s+BY\b", upper[i:]):
            return True
    return False


def _norm_value(v: Any) -> Any:
    if isinstance(v, float):
        if v != v:  # NaN
            return "NaN"
        return float(f"{v:.10g}")
    return v


def _norm_rows(rows: Sequence[Sequence[Any]]) -> list[tuple[Any, ...]]:
    return [tuple(_norm_value(v) for v in r) for r in rows]


def _rows_equal(gold: list[tuple[Any, ...]], pred: list[tuple[Any, ...]], ordered: bool) -> bool:
    if ordered:
        return gold == pred
    return collections.Counter(gold) == collections.Counter(pred)


def results_match(
    gold_rows: Sequence[Sequence[Any]], pred_rows: Sequence[Sequence[Any]], ordered: bool, max_permutations: int = 256
) -> bool:
    """Multiset (or, if ``ordered``, list) equality of rows, up to a permutation of the columns."""
    gold, pred = _norm_rows(gold_rows), _norm_rows(pred_rows)
    if len(gold) != len(pred):
        return False
    if not gold:
        return True
    k = len(gold[0])
    if any(len(r) != k for r in pred):
        return False
    if _rows_equal(gold, pred, ordered):
        return True
    # Column permutations: pred column j can stand for gold column i only if their value multisets agree.
    gold_cols = [collections.Counter(r[i] for r in gold) for i in range(k)]
    pred_cols = [collections.Counter(r[j] for r in pred) for j in range(k)]
    candidates = [[j for j in range(k) if pred_cols[j] == gold_cols[i]] for i in range(k)]
    if any(not c for c in candidates):
        return False
    tried = 0

    def search(i: int, used: set[int], perm: list[int]) -> bool:
        nonlocal tried
        if tried >= max_permutations:
            return False
        if i == k:
            tried += 1
            if perm == list(range(k)):
                return False  # identity already checked
            return _rows_equal(gold, [tuple(r[j] for j in perm) for r in pred], ordered)
        for j in candidates[i]:
            if j not in used:
                used.add(j)
                perm.append(j)
                if search(i + 1, used, perm):
                    return True
                perm.pop()
                used.discard(j)
        return False

    return search(0, set(), [])


# --------------------------------------------------------------------------------------------------
# pool and gold cache

_MODULE = "dyjr_verl.rewards.sql"  # the importable name, also when verl loaded this file by path
_POOL = LazyPool("sql-exec", memory_limit_mb=WORKER_MEMORY_LIMIT_MB, initializer=by_reference(_worker_init, _MODULE))

def configure_pool(
    max_workers: int | None = None, memory_limit_mb: int | None = WORKER_MEMORY_LIMIT_MB, start_method: str | None = None
) -> None:
    """Set the worker count / memory cap of the shared SQL pool (restarts it if already running)."""
    _POOL.configure(max_workers, memory_limit_mb, start_method)


def get_pool() -> DeadlinePool:
    """The process-wide SQL execution pool; created on first use, workers started on demand."""
    return _POOL.get()


class _Gold(NamedTuple):
    status: str  # "ok" | "error"
    rows: tuple[tuple[Any, ...], ...] = ()
    ordered: bool = False
    message: str = ""


_gold_cache: "collections.OrderedDict[tuple[Any, ...], _Gold]" = collections.OrderedDict()
_gold_lock = threading.Lock()
_gold_stats = {"hits": 0, "misses": 0}


def clear_gold_cache() -> None:
    with _gold_lock:
        _gold_cache.clear()
        _gold_stats.update(hits=0, misses=0)


def gold_cache_stats() -> dict[str, int]:
    """``{"hits", "misses", "size"}`` of the in-process gold-result cache."""
    with _gold_lock:
        return {**_gold_stats, "size": len(_gold_cache)}


def _gold_key(db_path: str, gold_sql: str) -> tuple[Any, ...]:
    st = os.stat(db_path)
    return (os.path.realpath(db_path), st.st_mtime_ns, st.st_size, gold_sql)


def _gold_from_outcome(gold_sql: str, ok: bool, value: Any, max_rows: int) -> _Gold:
    if not ok:
        why = "timed out" if isinstance(value, DeadlineExceeded) else f"{type(value).__name__}: {value}"
        return _Gold("error", message=f"gold SQL failed: {why}")
    if value[0] != "ok":
        return _Gold("error", message=f"gold SQL failed: {value[1]}")
    if value[3]:
        return _Gold("error", message=f"gold result has more than max_rows={max_rows} rows")
    return _Gold("ok", tuple(value[2]), gold_is_ordered(gold_sql))


# --------------------------------------------------------------------------------------------------
# scoring


class _Options(NamedTuple):
    timeout_s: float
    gold_timeout_s: float
    max_rows: int
    db_root: str | None
    use_gold_cache: bool
    soft_deadline: bool
    scores: dict[str, float]


def _positive(name: str, value: Any) -> float:
    try:
        f = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number, got {value!r}") from None
    if not f > 0:
        raise ValueError(f"{name} must be > 0, got {f}")
    return f


#: The keyword options (``reward_kwargs``) of every entry point.
OPTIONS = ("db_root", "timeout_s", "gold_timeout_s", "max_rows", "gold_cache", "soft_deadline", "reward_values")


def _options(kwargs: dict[str, Any]) -> _Options:
    check_kwargs(_MODULE, kwargs, OPTIONS)
    scores = dict(_DEFAULT_SCORES)
    overrides = kwargs.get("reward_values") or {}
    unknown = set(overrides) - set(scores)
    if unknown:
        raise ValueError(f"reward_values has unknown statuses {sorted(unknown)}; expected {list(STATUSES)}")
    scores.update({k: float(v) for k, v in dict(overrides).items()})
    return _Options(
        timeout_s=_positive("timeout_s", kwargs.get("timeout_s", DEFAULT_TIMEOUT_S)),
        gold_timeout_s=_positive("gold_timeout_s", kwargs.get("gold_timeout_s", DEFAULT_GOLD_TIMEOUT_S)),
        max_rows=int(_positive("max_rows", kwargs.get("max_rows", DEFAULT_MAX_ROWS))),
        db_root=kwargs.get("db_root"),
        use_gold_cache=bool_option("gold_cache", kwargs.get("gold_cache", True)),
        soft_deadline=bool_option("soft_deadline", kwargs.get("soft_deadline", True)),
        scores=scores,
    )


def resolve_db_path(extra_info: dict[str, Any] | None, db_root: str | os.PathLike[str] | None = None) -> str:
    """The SQLite file for a sample.

    ``extra_info["db_path"]`` is absolute, or relative to the database root (``data.sql --relative-to``,
    for clusters that mount the data at different paths); the root is ``db_root`` (the reward kwarg),
    ``extra_info["db_root"]`` or ``$DYJR_SQL_DB_ROOT``. When that file does not exist (e.g. a parquet made
    on another machine), ``<root>/<db_id>/<db_id>.sqlite``.
    """
    info = dict(extra_info or {})
    db_path = info.get("db_path")
    db_id = info.get("db_id")
    root = db_root or info.get("db_root") or os.environ.get("DYJR_SQL_DB_ROOT")
    if db_path:
        if not os.path.isabs(db_path) and not root:
            raise ValueError(
                f"db_path {db_path!r} is relative to a database root: pass reward kwarg db_root=DIR "
                "(reward.custom_reward_function.reward_kwargs.db_root) or set DYJR_SQL_DB_ROOT"
            )
        cand = Path(root, db_path) if root else Path(db_path)  # Path(root, absolute) is the absolute path
        if cand.is_file():
            return str(cand)
    if db_id and root:
        cand = Path(root) / str(db_id) / f"{db_id}.sqlite"
        if cand.is_file():
            return str(cand)
        if db_path:
            raise ValueError(f"database not found: neither {Path(root, db_path)} nor {cand} exists")
        raise ValueError(f"database for db_id={db_id!r} not found: {cand} does not exist")
    if db_path:
        raise ValueError(f"db_path {str(cand)!r} does not exist and no db_id + db_root is given to fall back on")
    if db_id:
        raise ValueError(f"db_id={db_id!r} needs a database root: pass db_root=... or set DYJR_SQL_DB_ROOT")
    raise ValueError("extra_info must carry 'db_path', or 'db_id' plus a db_root (kwarg or DYJR_SQL_DB_ROOT)")


def _result(status: str, pred: str, opts: _Options) -> dict[str, Any]:
    return {
        "score": opts.scores[status],
        "acc": status == "correct",
        "pred": pred[:MAX_PRED_CHARS],
        "timeout": status == "timeout",
        "status": status,
    }


class _Job:
    """One sample between preparation (in-process) and judgement (after the pool replied)."""

    __slots__ = ("pred", "db_path", "gold_sql", "gold_key", "gold")

    def __init__(self, pred: str, db_path: str, gold_sql: str, gold_key: tuple[Any, ...] | None,
                 gold: _Gold | None = None) -> None:
        self.pred = pred
        self.db_path = db_path
        self.gold_sql = gold_sql
        self.gold_key = gold_key
        self.gold = gold


def _prepare(solution_str: Any, ground_truth: Any, extra_info: Any, opts: _Options) -> tuple[dict[str, Any] | None, _Job | None]:
    if not isinstance(ground_truth, str) or not ground_truth.strip():
        raise ValueError(f"ground_truth must be the gold SQL string, got {ground_truth!r}")
    # absolute: the fork server's working directory may differ from ours
    db_path = os.path.abspath(resolve_db_path(extra_info, opts.db_root))
    pred = extract_sql("" if solution_str is None else str(solution_str))
    if pred is None:
        return _result("format_error", "", opts), None
    if len(pred) > MAX_SQL_CHARS:
        return _result("exec_error", pred, opts), None
    gold_sql = _clean_sql(ground_truth)
    key = _gold_key(db_path, gold_sql) if opts.use_gold_cache else None
    gold = None
    if key is not None:
        with _gold_lock:
            gold = _gold_cache.get(key)
            if gold is not None:
                _gold_cache.move_to_end(key)
                _gold_stats["hits"] += 1
            else:
                _gold_stats["misses"] += 1
    return None, _Job(pred, db_path, gold_sql, key, gold)


def _store_gold(job: _Job, gold: _Gold) -> None:
    job.gold = gold
    if job.gold_key is None:
        return
    with _gold_lock:
        _gold_cache[job.gold_key] = gold
        while len(_gold_cache) > GOLD_CACHE_SIZE:
            _gold_cache.popitem(last=False)


def _exec_args(opts: _Options, timeout_s: float) -> tuple[float | None, float]:
    """(progress-handler deadline, hard pool deadline)."""
    soft = timeout_s if opts.soft_deadline else None
    return soft, timeout_s + HARD_KILL_GRACE_S


def _judge(job: _Job, ok: bool, value: Any, opts: _Options) -> dict[str, Any]:
    gold = job.gold
    assert gold is not None
    if gold.status != "ok":
        return _result("gold_error", job.pred, opts)
    if not ok:
        status = "timeout" if isinstance(value, DeadlineExceeded) else "exec_error"
        return _result(status, job.pred, opts)
    kind = value[0]
    if kind == "timeout":
        return _result("timeout", job.pred, opts)
    if kind != "ok":
        return _result("exec_error", job.pred, opts)
    _, _ncols, rows, truncated = value
    if truncated:
        return _result("wrong", job.pred, opts)  # the gold has at most max_rows rows
    same = results_match(gold.rows, rows, gold.ordered)
    return _result("correct" if same else "wrong", job.pred, opts)


def _submit_all(jobs: list[_Job], opts: _Options) -> list[tuple[bool, Any]]:
    """Run the missing golds and all predictions concurrently on the pool."""
    pool = get_pool()
    execute = by_reference(_execute_in_worker, _MODULE)
    gold_soft, gold_hard = _exec_args(opts, opts.gold_timeout_s)
    soft, hard = _exec_args(opts, opts.timeout_s)
    gold_futs: dict[tuple[Any, ...], Any] = {}
    per_job_gold = []
    for job in jobs:
        if job.gold is not None:
            per_job_gold.append(None)
            continue
        key = job.gold_key or (job.db_path, job.gold_sql, id(job))
        if key not in gold_futs:
            gold_futs[key] = pool.submit(
                execute, job.db_path, job.gold_sql, opts.max_rows, gold_soft, timeout_s=gold_hard
            )
        per_job_gold.append(gold_futs[key])
    pred_futs = [
        pool.submit(execute, job.db_path, job.pred, opts.max_rows, soft, timeout_s=hard) for job in jobs
    ]
    for job, gfut in zip(jobs, per_job_gold):
        if gfut is not None:
            exc = gfut.exception()
            if isinstance(exc, PoolStartError):
                raise exc  # broken environment: fail loudly rather than score everything
            _store_gold(job, _gold_from_outcome(job.gold_sql, exc is None, gfut.result() if exc is None else exc, opts.max_rows))
    out = []
    for fut in pred_futs:
        exc = fut.exception()
        if isinstance(exc, PoolStartError):
            raise exc
        out.append((True, fut.result()) if exc is None else (False, exc))
    return out


def compute_score(
    data_source: str | None = None,
    solution_str: str | None = None,
    ground_truth: str | None = None,
    extra_info: dict[str, Any] | None = None,
    **kwargs: Any,
) -> dict[str, Any]:
    """Score one response by execution match (verl custom-reward signature).

    Keyword options (verl: ``+reward.custom_reward_function.reward_kwargs.<name>=...``):
        db_root: database root for a relative ``extra_info["db_path"]`` and for ``extra_info["db_id"]``
            (else ``DYJR_SQL_DB_ROOT``).
        timeout_s: per-query deadline (default :data:`DEFAULT_TIMEOUT_S`); gold_timeout_s for the gold.
        max_rows: fetch cap (default :data:`DEFAULT_MAX_ROWS`); more rows than that is ``wrong``.
        gold_cache: reuse gold results (default True). reward_values: ``{status: score}`` overrides.
        soft_deadline: interrupt queries at ``timeout_s`` before the hard kill (default True).
    Raises ValueError for a missing/empty gold SQL, an unresolvable database or an unknown keyword
    (configuration errors; verl's own ``reward_router_address`` / ``reward_model_tokenizer`` are accepted).
    """
    return compute_score_batch([data_source], [solution_str], [ground_truth], [extra_info], **kwargs)[0]


async def compute_score_async(
    data_source: str | None = None,
    solution_str: str | None = None,
    ground_truth: str | None = None,
    extra_info: dict[str, Any] | None = None,
    **kwargs: Any,
) -> dict[str, Any]:
    """``async`` twin of :func:`compute_score`; the blocking wait happens in the default executor."""
    import asyncio
    import functools

    loop = asyncio.get_running_loop()
    call = functools.partial(compute_score, data_source, solution_str, ground_truth, extra_info, **kwargs)
    return await loop.run_in_executor(None, call)


def compute_score_batch(
    data_sources: Sequence[str | None] | None = None,
    solution_strs: Sequence[str | None] = (),
    ground_truths: Sequence[str | None] = (),
    extra_infos: Sequence[dict[str, Any] | None] | None = None,
    **kwargs: Any,
) -> list[dict[str, Any]]:
    """Score many responses; executions run concurrently on all pool workers."""
    n = len(solution_strs)
    if len(ground_truths) != n:
        raise ValueError(f"solution_strs and ground_truths differ in length: {n} vs {len(ground_truths)}")
    infos = list(extra_infos) if extra_infos is not None else [None] * n
    if len(infos) != n:
        raise ValueError(f"solution_strs and extra_infos differ in length: {n} vs {len(infos)}")
    opts = _options(kwargs)
    results: list[dict[str, Any] | None] = [None] * n
    jobs: list[tuple[int, _Job]] = []
    for i in range(n):
        done, job = _prepare(solution_strs[i], ground_truths[i], infos[i], opts)
        if done is not None:
            results[i] = done
        else:
            assert job is not None
            jobs.append((i, job))
    if jobs:
        outcomes = _submit_all([job for _, job in jobs], opts)
        for (i, job), (ok, value) in zip(jobs, outcomes):
            results[i] = _judge(job, ok, value, opts)
    return results  # type: ignore[return-value]


# --------------------------------------------------------------------------------------------------
# prompts and databases


def _pretty_ddl(ddl: str) -> str:
    """Normalise a CREATE TABLE with sqlglot: one column or constraint per line, consistent quoting.

    Schemas in the wild (Spider, BIRD) mix layouts and comments; a uniform rendering keeps prompts
    compact and comparable across databases. Raw text (whitespace-trimmed) if sqlglot cannot parse it.
    """
    import sqlglot
    from sqlglot import exp
    from sqlglot.errors import SqlglotError

    try:
        tree = sqlglot.parse_one(ddl, read="sqlite")
    except (SqlglotError, ValueError, RecursionError):
        tree = None
    if isinstance(tree, exp.Create) and isinstance(tree.this, exp.Schema) and not tree.args.get("properties"):
        try:
            name = tree.this.this.sql(dialect="sqlite")
            items = [e.sql(dialect="sqlite") for e in tree.this.expressions]
        except (SqlglotError, ValueError, RecursionError):
            items = []
        if items:
            return f"CREATE TABLE {name} (\n  " + ",\n  ".join(items) + "\n)"
    return re.sub(r"[ \t]+\n", "\n", ddl.strip())


def _quote_ident(name: str) -> str:
    from sqlglot import exp

    return exp.to_identifier(name, quoted=True).sql(dialect="sqlite")


def _fmt_value(v: Any, width: int = 60) -> str:
    if isinstance(v, bytes):
        return f"<{len(v)} bytes>"
    s = "NULL" if v is None else str(v).replace("\n", " ")
    return s if len(s) <= width else s[: width - 3] + "..."


def describe_schema(db_path: str | os.PathLike[str], sample_rows: int = 0) -> str:
    """CREATE TABLE statements from ``sqlite_master`` (sqlglot-formatted), plus optional sample rows.

    Cached per (file, mtime, size, sample_rows): data prep asks once per question, not once per database.
    """
    if sample_rows < 0:
        raise ValueError(f"sample_rows must be >= 0, got {sample_rows}")
    path = os.path.abspath(os.fspath(db_path))
    if not os.path.isfile(path):
        raise ValueError(f"database file not found: {path}")
    st = os.stat(path)
    return _describe_schema_cached(path, st.st_mtime_ns, st.st_size, int(sample_rows))


@functools.lru_cache(maxsize=256)
def _describe_schema_cached(path: str, mtime_ns: int, size: int, sample_rows: int) -> str:
    conn = open_readonly(path)
    try:
        tables = conn.execute(
            "SELECT name, sql FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%' AND sql IS NOT NULL"
        ).fetchall()
        parts = []
        for name, ddl in tables:
            block = _pretty_ddl(ddl) + ";"
            if sample_rows:
                cur = conn.execute(f"SELECT * FROM {_quote_ident(name)} LIMIT {int(sample_rows)}")
                cols = [d[0] for d in cur.description]
                rows = cur.fetchall()
                if rows:
                    lines = [" | ".join(cols)] + [" | ".join(_fmt_value(v) for v in r) for r in rows]
                    block += f"\n/* {len(rows)} example row{'' if len(rows) == 1 else 's'} from {name}:\n" + "\n".join(lines) + "\n*/"
            parts.append(block)
    except sqlite3.Error as exc:
        raise ValueError(f"cannot read the schema of {path}: {exc}") from None
    finally:
        conn.close()
    if not parts:
        raise ValueError(f"database {path} has no tables")
    return "\n\n".join(parts)


SQL_INSTRUCTION = (
    "Write one SQLite query that answers the question. Think step by step, then give the final "
    "query in a ```sql code block."
)


def build_sql_prompt(
    db_path: str | os.PathLike[str], question: str, sample_rows: int = 0, *, evidence: str | None = None
) -> str:
    """Schema-in-prompt user message: the database's CREATE TABLEs (+ sample rows), the question,
    BIRD's ``evidence`` if given, and the answer-format instruction matching :func:`extract_sql`."""
    if not question or not str(question).strip():
        raise ValueError("question is empty")
    schema = describe_schema(db_path, sample_rows)
    text = f"Database schema (SQLite):\n\n{schema}\n\nQuestion: {str(question).strip()}\n"
    if evidence and str(evidence).strip():
        text += f"External knowledge: {str(evidence).strip()}\n"
    return text + "\n" + SQL_INSTRUCTION


def build_spider_sqlite(schema_sql_path: str | os.PathLike[str], out_path: str | os.PathLike[str]) -> Path:
    """Build a SQLite file from a Spider ``schema.sql`` (CREATE + INSERT script); atomic, overwrites ``out_path``."""
    src, out = Path(schema_sql_path), Path(out_path)
    if not src.is_file():
        raise ValueError(f"schema file not found: {src}")
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".sqlite", dir=out.parent)
    os.close(fd)
    try:
        conn = sqlite3.connect(tmp)
        try:
            conn.executescript(src.read_text(encoding="utf-8", errors="replace"))
            conn.commit()
        finally:
            conn.close()
        os.replace(tmp, out)
    except sqlite3.Error as exc:
        raise ValueError(f"{src}: {exc}") from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out
