"""Experience pools of the replay baselines: RLEP's static pool and Ex-GRPO's online pool.

Pure python/numpy (no torch, no verl), so they are unit-tested directly and pickle into the
trainer checkpoint like the DyJR buffer.

Question identity
    Both pools are keyed by :func:`question_key`, a digest of the chat messages (and data source)
    of a training row, i.e. of what verl's ``RLHFDataset`` hands to the rollout as ``raw_prompt``.
    The offline RLEP collection computes it from the parquet's ``prompt`` column and the trainer
    from each TransferQueue row's ``raw_prompt``, so a pool survives shuffling, subsetting and
    re-indexing of the training file (``extra_info.index`` is optional in verl's schema and often 0).

RLEP (:class:`RLEPPool`, arXiv 2507.07451)
    Static: question -> list of verified-correct answer *strings* collected offline (64 samples,
    T=0.7, top-p 0.95, >= 2 correct). Per training group, M (default 2) candidates are drawn
    uniformly without replacement. A question with fewer than M candidates gets only what exists
    (the official code pads with empty answers that are then scored as failures; we do not).

Ex-GRPO (:class:`ExperiencePool`, arXiv 2510.02245)
    Online. After each step, for a question whose group of K rollouts has k correct:

    * k == K: the question is *retired*: removed from the pool and its bucket, and never stored or
      sampled again (the trainer also stops drawing it as a fresh prompt);
    * lbound < k <= rbound (defaults 0 and K-1): its correct trajectories are stored with their
      recorded log-probs, deduplicated by response tokens, and the question moves to bucket k
      (its *latest* k);
    * otherwise nothing changes (as in the official code, a k <= lbound neither stores nor moves
      the question).

    Selection: per-bucket counts ~ Multinomial(n, w) with w(k) proportional to N(k; K/2, sigma=1)
    over the non-empty buckets; a bucket asked for more questions than it holds gives all of them
    and the excess is redistributed over the other buckets by weight; questions are drawn without
    replacement inside a bucket. Trajectory choice (lowest mean entropy under the current policy)
    needs a forward pass and lives in the trainer.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np

__all__ = [
    "question_key",
    "normalise_messages",
    "RLEPPool",
    "bucket_weight",
    "bucket_probabilities",
    "draw_bucket_counts",
    "PoolTrajectory",
    "ExperiencePool",
    "RLEP_POOL_COLUMNS",
    "pool_state_digest",
]

# ------------------------------------------------------------------------------------------------
# question identity
# ------------------------------------------------------------------------------------------------


def _plain(x: Any) -> Any:
    """numpy arrays / tensordict LinkedLists / tuples -> lists, recursively (json-able)."""
    if isinstance(x, Mapping):
        return {str(k): _plain(v) for k, v in x.items()}
    if isinstance(x, np.ndarray):
        return [_plain(v) for v in x.tolist()]
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    if isinstance(x, np.generic):
        return x.item()
    return x


def normalise_messages(raw_prompt: Any) -> list[list[Any]]:
    """Chat messages as ``[[role, content], ...]`` with plain python values.

    A bare string is one user message, so a pool built from a plain-text prompt column matches.
    """
    messages = _plain(raw_prompt)
    if isinstance(messages, str):
        return [["user", messages]]
    if isinstance(messages, Mapping):
        messages = [messages]
    out = []
    for m in messages:
        if isinstance(m, Mapping):
            out.append([str(m.get("role", "")), m.get("content", "")])
        else:
            out.append(["", m])
    return out


def question_key(raw_prompt: Any, data_source: Any = None) -> str:
    """Stable 16-hex-digit identity of a training question (see the module docstring)."""
    payload = json.dumps(
        [None if data_source is None else str(data_source), normalise_messages(raw_prompt)],
        ensure_ascii=False, sort_keys=True, default=str, separators=(",", ":"),
    )
    return hashlib.sha1(payload.encode("utf-8")).hexdigest()[:16]


# ------------------------------------------------------------------------------------------------
# RLEP: static pool of answer strings
# ------------------------------------------------------------------------------------------------

RLEP_POOL_COLUMNS = ("question_key", "data_source", "index", "num_samples", "num_correct", "candidates")
_RLEP_META_KEY = b"dyjr_verl.rlep_pool"


class RLEPPool:
    """question key -> verified-correct answer strings (RLEP's offline experience pool).

    ``min_correct`` is the admission rule (RLEP: >= 2 correct answers out of N samples); it is
    applied when saving and again when loading, so a pool collected with a looser rule can be used
    with a stricter one.
    """

    def __init__(self, entries: Mapping[str, Sequence[str]], *, min_correct: int = 2, meta: Optional[dict] = None):
        if min_correct < 1:
            raise ValueError(f"min_correct must be >= 1, got {min_correct}")
        self.min_correct = int(min_correct)
        self.meta: dict = dict(meta or {})
        self._entries: dict[str, list[str]] = {
            str(k): [str(a) for a in v] for k, v in entries.items() if len(v) >= self.min_correct
        }
        self.dropped = sum(1 for v in entries.values() if len(v) < self.min_correct)

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: object) -> bool:
        return key in self._entries

    @property
    def num_candidates(self) -> int:
        return sum(len(v) for v in self._entries.values())

    def questions(self) -> list[str]:
        return list(self._entries)

    def candidates(self, key: str) -> list[str]:
        return list(self._entries.get(key, ()))

    def draw(self, key: str, m: int, rng: np.random.Generator) -> list[str]:
        """Up to ``m`` distinct candidates of ``key``, uniformly without replacement (fewer when
        the question has fewer; none when it is not in the pool). No filler answers."""
        cands = self._entries.get(key)
        if not cands or m <= 0:
            return []
        k = min(int(m), len(cands))
        idx = rng.choice(len(cands), size=k, replace=False)
        return [cands[int(i)] for i in idx]

    def metrics(self, prefix: str = "pool/") -> dict[str, float]:
        n = len(self)
        return {
            f"{prefix}questions": float(n),
            f"{prefix}candidates": float(self.num_candidates),
            f"{prefix}candidates_mean": float(self.num_candidates / n) if n else 0.0,
        }

    def fingerprint(self) -> str:
        """Content digest (questions and their answers, order-independent)."""
        h = hashlib.sha256()
        for key in sorted(self._entries):
            h.update(key.encode())
            for a in self._entries[key]:
                h.update(b"\0" + a.encode("utf-8"))
            h.update(b"\1")
        return h.hexdigest()[:16]

    def state_dict(self) -> dict[str, Any]:
        """The pool is static, so a checkpoint records only which pool was in use."""
        return {"version": 1, "fingerprint": self.fingerprint(), "questions": len(self), "path": self.meta.get("path")}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Resuming with another pool than the one saved is allowed but reported."""
        if state.get("fingerprint") not in (None, self.fingerprint()):
            import warnings

            warnings.warn(
                f"RLEP pool differs from the checkpoint's ({state.get('path')}, {state.get('questions')} questions)",
                stacklevel=2,
            )

    # -- file format: one parquet row per question ----------------------------------------------
    def save(self, path: str | Path, *, rows: Optional[Iterable[Mapping[str, Any]]] = None) -> Path:
        """Write the pool as parquet (columns :data:`RLEP_POOL_COLUMNS`, settings in the schema
        metadata). ``rows`` may carry per-question ``data_source`` / ``index`` / ``num_samples`` /
        ``num_correct``; questions not in it get nulls."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        extra = {str(r["question_key"]): r for r in (rows or [])}
        table_rows = []
        for key, cands in self._entries.items():
            r = extra.get(key, {})
            table_rows.append({
                "question_key": key,
                "data_source": None if r.get("data_source") is None else str(r["data_source"]),
                "index": None if r.get("index") is None else int(r["index"]),
                "num_samples": None if r.get("num_samples") is None else int(r["num_samples"]),
                "num_correct": int(r.get("num_correct", len(cands))),
                "candidates": list(cands),
            })
        schema = pa.schema([
            ("question_key", pa.string()), ("data_source", pa.string()), ("index", pa.int64()),
            ("num_samples", pa.int64()), ("num_correct", pa.int64()), ("candidates", pa.list_(pa.string())),
        ])
        table = pa.Table.from_pylist(table_rows, schema=schema)
        meta = {**self.meta, "min_correct": self.min_correct}
        table = table.replace_schema_metadata({_RLEP_META_KEY: json.dumps(meta, default=str).encode()})
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(path.suffix + ".tmp")
        pq.write_table(table, tmp)
        tmp.replace(path)
        return path

    @classmethod
    def load(cls, path: str | Path, *, min_correct: int = 2) -> "RLEPPool":
        import pyarrow.parquet as pq

        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(
                f"RLEP experience pool not found: {path} (build it with `python -m dyjr_verl.baselines.rlep_collect`)"
            )
        table = pq.read_table(path)
        missing = [c for c in ("question_key", "candidates") if c not in table.column_names]
        if missing:
            raise ValueError(f"{path} is not an RLEP pool: missing columns {missing}")
        raw_meta = (table.schema.metadata or {}).get(_RLEP_META_KEY)
        meta = json.loads(raw_meta) if raw_meta else {}
        entries: dict[str, list[str]] = {}
        for key, cands in zip(table.column("question_key").to_pylist(), table.column("candidates").to_pylist()):
            entries.setdefault(str(key), []).extend(cands or [])
        pool = cls(entries, min_correct=min_correct, meta=meta)
        pool.meta["path"] = str(path)
        return pool


# ------------------------------------------------------------------------------------------------
# Ex-GRPO: bucket weights and weighted bucket sampling
# ------------------------------------------------------------------------------------------------

BUCKET_WEIGHTINGS = ("normal", "linear", "sqrt", "uniform")


def bucket_weight(k: int, num_rollouts: int, method: str = "normal", sigma: float = 1.0) -> float:
    """Unnormalised weight of bucket ``k`` (k correct of K = ``num_rollouts``).

    ``normal``: N(k; K/2, sigma) (Ex-GRPO's default: medium-difficulty questions first);
    ``linear``: k/K; ``sqrt``: sqrt(k/K); ``uniform``: 1.
    """
    if method == "normal":
        mu = num_rollouts / 2.0
        return math.exp(-((k - mu) ** 2) / (2.0 * sigma**2)) / math.sqrt(2.0 * math.pi * sigma**2)
    if method == "linear":
        return k / num_rollouts
    if method == "sqrt":
        return math.sqrt(max(k, 0) / num_rollouts)
    if method == "uniform":
        return 1.0
    raise ValueError(f"unknown bucket weighting {method!r}; choose from {BUCKET_WEIGHTINGS}")


def bucket_probabilities(
    sizes: Mapping[int, int], num_rollouts: int, method: str = "normal", sigma: float = 1.0
) -> dict[int, float]:
    """Selection probability of each non-empty bucket (weights normalised over non-empty buckets).

    If every non-empty bucket has weight 0 (e.g. ``linear`` with only bucket 0), they are uniform.
    """
    live = {k: bucket_weight(k, num_rollouts, method, sigma) for k, n in sizes.items() if n > 0}
    total = sum(live.values())
    if not live:
        return {}
    if total <= 0:
        return {k: 1.0 / len(live) for k in live}
    return {k: w / total for k, w in live.items()}


def draw_bucket_counts(
    sizes: Mapping[int, int], probs: Mapping[int, float], n: int, rng: np.random.Generator
) -> dict[int, int]:
    """How many questions to take from each bucket: Multinomial(n, probs), capped at the bucket
    sizes, with any excess redistributed by the same probabilities over buckets that still have
    room. Returns exactly ``min(n, sum(sizes))`` in total."""
    room = {k: int(sizes.get(k, 0)) for k in probs if sizes.get(k, 0) > 0}
    counts = {k: 0 for k in room}
    want = min(int(n), sum(room.values()))
    while want > 0:
        keys = [k for k in room if room[k] > 0]
        p = np.array([max(probs[k], 0.0) for k in keys], dtype=np.float64)
        p = p / p.sum() if p.sum() > 0 else np.full(len(keys), 1.0 / len(keys))
        draw = rng.multinomial(want, p)
        want = 0
        for k, c in zip(keys, draw.tolist()):
            take = min(c, room[k])
            counts[k] += take
            room[k] -= take
            want += c - take  # excess goes round again, over the buckets that still have room
    return counts


# ------------------------------------------------------------------------------------------------
# Ex-GRPO: the online pool
# ------------------------------------------------------------------------------------------------


@dataclass(eq=False)
class PoolTrajectory:
    """A stored correct trajectory: response tokens and their recorded per-token log-probs."""

    response_ids: Any
    logprobs: Any
    score: float
    step: int

    def __post_init__(self) -> None:
        self.response_ids = np.asarray(self.response_ids, dtype=np.int64).reshape(-1)
        self.logprobs = np.asarray(self.logprobs, dtype=np.float32).reshape(-1)
        if len(self.response_ids) != len(self.logprobs):
            raise ValueError(
                f"response_ids ({len(self.response_ids)}) and logprobs ({len(self.logprobs)}) must have the same length"
            )
        self.score = float(self.score)
        self.step = int(self.step)

    @property
    def num_tokens(self) -> int:
        return len(self.response_ids)

    def token_key(self) -> bytes:
        """Deduplication key: the response token sequence."""
        return self.response_ids.astype(np.int64).tobytes()

    def to_dict(self) -> dict[str, Any]:
        return {"response_ids": self.response_ids, "logprobs": self.logprobs, "score": self.score, "step": self.step}


@dataclass
class _Question:
    prompt_row: dict
    k: int
    trajectories: list[PoolTrajectory] = field(default_factory=list)
    seen: set = field(default_factory=set)


class ExperiencePool:
    """Ex-GRPO's experience pool: questions bucketed by their latest k, correct trajectories with
    recorded log-probs, retirement of solved questions (see the module docstring).

    Args:
        num_rollouts: K, rollouts per group (verl's ``rollout.n``).
        lbound, rbound: store when ``lbound < k <= rbound``; ``rbound=None`` means K-1.
        max_per_question: keep at most this many trajectories per question (oldest dropped
            first); 0 keeps all (Ex-GRPO's default).
        weighting, sigma: bucket weighting (:func:`bucket_weight`).
    """

    def __init__(
        self,
        num_rollouts: int,
        *,
        lbound: int = 0,
        rbound: Optional[int] = None,
        max_per_question: int = 0,
        weighting: str = "normal",
        sigma: float = 1.0,
    ):
        if num_rollouts < 2:
            raise ValueError(f"num_rollouts (K) must be >= 2, got {num_rollouts}")
        self.K = int(num_rollouts)
        self.lbound = int(lbound)
        self.rbound = self.K - 1 if rbound is None else int(rbound)
        if not (0 <= self.lbound < self.rbound <= self.K - 1):
            raise ValueError(f"need 0 <= lbound < rbound <= K-1, got lbound={self.lbound} rbound={self.rbound} K={self.K}")
        if weighting not in BUCKET_WEIGHTINGS:
            raise ValueError(f"unknown bucket weighting {weighting!r}; choose from {BUCKET_WEIGHTINGS}")
        self.max_per_question = int(max_per_question)
        self.weighting = weighting
        self.sigma = float(sigma)
        self._questions: dict[str, _Question] = {}
        self._buckets: dict[int, dict[str, None]] = {}  # ordered sets: deterministic sampling
        self._retired: set[str] = set()
        self._step_counts = self._zero_counts()

    @staticmethod
    def _zero_counts() -> dict[str, int]:
        return {"stored": 0, "duplicates": 0, "retired": 0, "updated_questions": 0, "new_questions": 0}

    # -- queries -----------------------------------------------------------------------------
    def __len__(self) -> int:
        """Questions in the pool (retired ones excluded)."""
        return len(self._questions)

    def __contains__(self, key: object) -> bool:
        return key in self._questions

    @property
    def num_trajectories(self) -> int:
        return sum(len(q.trajectories) for q in self._questions.values())

    @property
    def retired(self) -> frozenset[str]:
        return frozenset(self._retired)

    def is_retired(self, key: str) -> bool:
        return key in self._retired

    def bucket_of(self, key: str) -> Optional[int]:
        q = self._questions.get(key)
        return None if q is None else q.k

    def bucket_sizes(self) -> dict[int, int]:
        return {k: len(v) for k, v in sorted(self._buckets.items()) if v}

    def trajectories(self, key: str) -> list[PoolTrajectory]:
        q = self._questions.get(key)
        return list(q.trajectories) if q else []

    def prompt_row(self, key: str) -> dict:
        return self._questions[key].prompt_row

    # -- updates -----------------------------------------------------------------------------
    def begin_step(self) -> None:
        """Reset the per-step counters reported by :meth:`metrics`."""
        self._step_counts = self._zero_counts()

    def update_group(
        self,
        key: str,
        *,
        num_correct: int,
        group_size: int,
        correct: Sequence[PoolTrajectory],
        prompt_row: Optional[dict] = None,
    ) -> str:
        """Apply one finished group (k = ``num_correct`` of ``group_size`` rollouts) to the pool.

        ``correct``: the group's correct trajectories (already-stored duplicates are skipped).
        ``prompt_row``: the dataloader row of the question, needed the first time it is stored
        (the trainer re-issues it as a prompt when the question is selected for replay).

        Returns ``"retired"``, ``"stored"``, ``"ignored"`` (k outside (lbound, rbound], or a retired
        question) or ``"incomplete"`` (``group_size != K``: failed rollouts; nothing changes).
        """
        if key in self._retired:
            return "ignored"
        if group_size != self.K:
            return "incomplete"
        k = int(num_correct)
        if not 0 <= k <= self.K:
            raise ValueError(f"num_correct must be in [0, {self.K}], got {k}")
        if k == self.K:
            self._retire(key)
            return "retired"
        if not (self.lbound < k <= self.rbound):
            return "ignored"
        q = self._questions.get(key)
        if q is None:
            if prompt_row is None:
                raise ValueError(f"question {key} enters the pool without its prompt row")
            q = self._questions[key] = _Question(prompt_row=prompt_row, k=k)
            self._step_counts["new_questions"] += 1
        else:
            self._buckets.get(q.k, {}).pop(key, None)
            q.k = k
        self._buckets.setdefault(k, {})[key] = None
        self._step_counts["updated_questions"] += 1
        for traj in correct:
            tk = traj.token_key()
            if tk in q.seen:
                self._step_counts["duplicates"] += 1
                continue
            q.seen.add(tk)
            q.trajectories.append(traj)
            self._step_counts["stored"] += 1
        if self.max_per_question > 0:
            while len(q.trajectories) > self.max_per_question:
                old = q.trajectories.pop(0)
                q.seen.discard(old.token_key())
        return "stored"

    def _retire(self, key: str) -> None:
        self._retired.add(key)
        q = self._questions.pop(key, None)
        if q is not None:
            self._buckets.get(q.k, {}).pop(key, None)
        self._step_counts["retired"] += 1

    # -- selection ---------------------------------------------------------------------------
    def bucket_probabilities(self) -> dict[int, float]:
        return bucket_probabilities(self.bucket_sizes(), self.K, self.weighting, self.sigma)

    def sample_questions(self, n: int, rng: np.random.Generator) -> list[str]:
        """Up to ``n`` distinct questions, bucket-weighted (see :func:`draw_bucket_counts`)."""
        sizes = self.bucket_sizes()
        counts = draw_bucket_counts(sizes, self.bucket_probabilities(), n, rng)
        out: list[str] = []
        for k in sorted(counts):
            c = counts[k]
            if c <= 0:
                continue
            members = list(self._buckets[k])
            idx = rng.choice(len(members), size=c, replace=False)
            out.extend(members[int(i)] for i in idx)
        return out

    # -- reporting / state ---------------------------------------------------------------------
    def metrics(self, prefix: str = "pool/") -> dict[str, float]:
        """Pool size, retired questions, this step's admissions and the bucket histogram."""
        out = {
            f"{prefix}questions": float(len(self)),
            f"{prefix}trajectories": float(self.num_trajectories),
            f"{prefix}retired_total": float(len(self._retired)),
        }
        out.update({f"{prefix}{k}": float(v) for k, v in self._step_counts.items()})
        sizes = self.bucket_sizes()
        for k in range(self.K + 1):
            if self.lbound < k <= self.rbound:
                out[f"{prefix}bucket/{k}"] = float(sizes.get(k, 0))
        return out

    def state_dict(self) -> dict[str, Any]:
        return {
            "version": 1,
            "K": self.K,
            "questions": {
                key: {"prompt_row": q.prompt_row, "k": q.k, "trajectories": [t.to_dict() for t in q.trajectories]}
                for key, q in self._questions.items()
            },
            "buckets": {k: list(v) for k, v in self._buckets.items()},
            "retired": sorted(self._retired),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if state.get("version") != 1:
            raise ValueError(f"unsupported experience pool state version {state.get('version')!r}")
        if int(state["K"]) != self.K:
            raise ValueError(f"pool state was saved with K={state['K']}, this run has K={self.K}")
        self._questions = {}
        for key, q in state["questions"].items():
            trajs = [PoolTrajectory(**t) for t in q["trajectories"]]
            self._questions[key] = _Question(
                prompt_row=q["prompt_row"], k=int(q["k"]), trajectories=trajs, seen={t.token_key() for t in trajs}
            )
        self._buckets = {int(k): {key: None for key in v if key in self._questions} for k, v in state["buckets"].items()}
        self._retired = set(state["retired"])
        self._step_counts = self._zero_counts()


def pool_state_digest(state: Mapping[str, Any]) -> str:
    """Content digest of an :meth:`ExperiencePool.state_dict` (questions, buckets, trajectories,
    retired set); equal states give equal digests across processes."""
    h = hashlib.sha256()
    h.update(repr((state.get("version"), state.get("K"))).encode())
    for key in sorted(state.get("questions", {})):
        q = state["questions"][key]
        h.update(repr((key, int(q["k"]))).encode())
        for t in q["trajectories"]:
            h.update(repr((float(t["score"]), int(t["step"]))).encode())
            for name in ("response_ids", "logprobs"):
                arr = np.ascontiguousarray(np.asarray(t[name]))
                h.update(str(arr.dtype).encode() + arr.tobytes())
    h.update(repr(sorted(state.get("retired", []))).encode())
    return h.hexdigest()[:16]
