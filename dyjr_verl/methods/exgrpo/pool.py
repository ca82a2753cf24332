"""Ex-GRPO's online experience pool (arXiv 2510.02245): questions bucketed by how many of their K
rollouts were correct, correct trajectories with their recorded log-probs, retirement of solved
questions. Pure python/numpy, keyed by :func:`dyjr_verl.replay.questions.question_key`.

After each step, for a question whose group of K rollouts has k correct:

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
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np

from dyjr_verl.replay.questions import KeyedByQuestion

__all__ = [
    "BUCKET_WEIGHTINGS",
    "bucket_weight",
    "bucket_probabilities",
    "draw_bucket_counts",
    "PoolTrajectory",
    "ExperiencePool",
    "pool_state_digest",
]

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
        # copies: a view of a tensor unbound from a TransferQueue batch would pin the whole step's buffer
        self.response_ids = np.array(self.response_ids, dtype=np.int64, copy=True).reshape(-1)
        self.logprobs = np.array(self.logprobs, dtype=np.float32, copy=True).reshape(-1)
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


class ExperiencePool(KeyedByQuestion):
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
    def _by_question(self) -> dict:
        return self._questions  # retired questions are not in it: len() excludes them

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
