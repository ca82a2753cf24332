"""Time-Sensitive Dynamic Buffer: FIFO by age with an (optionally adaptive) window.

DyJR's abstract says only "FIFO with adaptive sizing; keeps temporally proximal samples so the
buffer tracks the evolving model". Everything below is a reconstruction, stated precisely so that
experiments can vary it.

Ages and the window
    Every entry carries the step ``s`` it was pushed at (the ``step`` argument of :meth:`push`,
    which is authoritative; ``Trajectory.step`` is carried as metadata). At the current step ``t``
    (set by :meth:`advance` or :meth:`push`) its age is ``t - s`` and it is *alive* iff
    ``t - s <= W``, where the window ``W`` is an integer in ``[min_age, max_age]``.
    Dead entries are evicted immediately (on ``advance``/``push``/when ``W`` shrinks); growing
    ``W`` again never resurrects them. Intended call order per training step ``t``::

        buffer.advance(t)                 # evict entries older than W
        rows = buffer.sample(n, rng)      # ages 1..W (this step's rollouts are not pushed yet)
        ... train on fresh + rows ...
        buffer.report_drift(drift)        # adaptive window only (drift from the loss metrics)
        buffer.push(t, this_steps_rollouts)

    So ``max_age = 1`` replays only the previous step's rollouts. Entries pushed at the current
    step (age 0) are also eligible for :meth:`sample`; sample before pushing to avoid them.

Capacity
    At most ``capacity`` entries (null: ``max_age`` x ``rows_per_step``, the rollouts of one step, so
    that the window decides; :func:`~dyjr_verl.methods.dyjr.config.resolved_capacity`). On overflow
    the oldest steps go first; the step that is only partly evicted loses a uniformly random subset
    drawn from the ``rng`` of :meth:`push` (the trainer's seeded replay stream), not its first- or
    last-pushed rows: the order of a step's rows is verl's batch balancing, not random. Storage is
    a deque of per-step blocks (a list each), so push and age eviction are O(1) amortised per
    entry, capacity eviction O(rows of the oldest step) per push, and random access for sampling
    is O(1) per drawn entry after an O(#blocks) prefix sum (#blocks <= W + 1).

Admission (``admit``)
    ``correct``: reward > ``correct_threshold`` (default 0.5, i.e. a 0/1 or ±1 verifier's
    success); ``all``: every trajectory; ``threshold``: reward >= ``admit_threshold``.
    NaN rewards fail both comparisons.

Adaptive window (``window: adaptive``)
    :mod:`.window` (:class:`~dyjr_verl.methods.dyjr.window.DriftWindow`): W shrinks when the replayed
    tokens' drift is high and grows back after calm steps; entries outside a shrunk window are evicted.

Frozen (``frozen: true``; the static-reference ablation)
    The first :meth:`push` that admits anything is the fill (the start model's admitted rollouts, or
    the earliest step's that has any, capacity applied as for any push; each empty push before it is
    warned); after it :meth:`push` only moves the clock (nothing admitted, nothing counted) and
    nothing is ever evicted by age, so the content stays the fill and ages grow by one per step.
    ``window: adaptive`` is refused by the config. Whether the fill happened is part of the state,
    and a state saved frozen (or not) is refused by a buffer that is not (or is).

Entries are the replay core's compact stored rows (:class:`dyjr_verl.replay.rows.Trajectory`:
private numpy copies of the tokens, mask and recorded log-probs, plus tags and an optional top-k
record), so the buffer and its :meth:`state_dict` are picklable and pin no TransferQueue buffer;
sampled trajectories are shared references — treat them as read-only.
"""

from __future__ import annotations

import hashlib
import logging
from collections import deque
from typing import Any, Iterable, Iterator, Optional, Union

import numpy as np
import torch

from dyjr_verl.methods.dyjr.config import BufferConfig, resolved_capacity
from dyjr_verl.methods.dyjr.window import DriftWindow
from dyjr_verl.replay.rows import Trajectory

__all__ = ["Trajectory", "TimeSensitiveBuffer", "buffer_digest"]

logger = logging.getLogger(__name__)

#: 2: compact stored rows (tags + record instead of a payload of every field of the row)
_STATE_VERSION = 2


class _Block:
    """All entries pushed at one step, in push order."""

    __slots__ = ("step", "items")

    def __init__(self, step: int, items: Optional[list[Trajectory]] = None):
        self.step = step
        self.items: list[Trajectory] = items if items is not None else []

    def __len__(self) -> int:
        return len(self.items)

    def get(self, i: int) -> Trajectory:
        return self.items[i]

    def alive(self) -> list[Trajectory]:
        return self.items


RngLike = Union[np.random.Generator, int, None]


def _nbytes(value: Any) -> int:
    if isinstance(value, torch.Tensor):
        return value.untyped_storage().nbytes()
    if isinstance(value, np.ndarray):
        return value.nbytes if value.base is None else getattr(value.base, "nbytes", value.nbytes)
    if isinstance(value, (tuple, list)):
        return sum(_nbytes(v) for v in value)
    return 0  # a scalar record (e.g. a stored advantage) or none


def _generator(rng: RngLike) -> np.random.Generator:
    return rng if isinstance(rng, np.random.Generator) else np.random.default_rng(0 if rng is None else rng)


class TimeSensitiveBuffer:
    """FIFO-by-age replay store with a hard capacity and an optional adaptive window.

    See the module docstring for the exact age, eviction, admission and adaptive-window rules.
    """

    def __init__(self, config: Optional[BufferConfig] = None, *, rows_per_step: Optional[int] = None):
        self.config = (config if config is not None else BufferConfig()).validate("dyjr.buffer")
        #: the bound on entries (None: only ages bound them; see the module docstring)
        self.capacity = resolved_capacity(self.config, rows_per_step)
        self._blocks: deque[_Block] = deque()
        self._size = 0
        self._step: Optional[int] = None
        self._drift_window = DriftWindow(self.config)
        self._counters = self._zero_counters()
        self._totals = self._zero_counters()
        self._filled = False  # frozen: the fill (first push that admitted anything) happened

    # ------------------------------------------------------------------------------------------
    @staticmethod
    def _zero_counters() -> dict[str, int]:
        return {"admitted": 0, "rejected": 0, "evicted_age": 0, "evicted_capacity": 0}

    def _count(self, key: str, n: int = 1) -> None:
        self._counters[key] += n
        self._totals[key] += n

    @property
    def window(self) -> int:
        """Current window W (steps); equals ``max_age`` for a fixed window."""
        return self._drift_window.size

    @property
    def step(self) -> Optional[int]:
        """The current step (None before the first ``advance``/``push``)."""
        return self._step

    @property
    def frozen(self) -> bool:
        return bool(self.config.frozen)

    @property
    def accepting(self) -> bool:
        """False once a frozen buffer has been filled: pushes then store nothing."""
        return not (self.frozen and self._filled)

    def __len__(self) -> int:
        return self._size

    def __iter__(self) -> Iterator[Trajectory]:
        """Alive entries, oldest first."""
        for block in self._blocks:
            yield from block.alive()

    def admits(self, traj: Trajectory) -> bool:
        """The admission filter alone (``admit`` mode of the config)."""
        return self.admits_reward(traj.reward)

    def admits_reward(self, reward: float) -> bool:
        """Whether a trajectory with this reward would be admitted (before its tokens are read)."""
        mode = self.config.admit
        if mode == "all":
            return True
        if mode == "correct":
            return reward > self.config.correct_threshold
        return reward >= float(self.config.admit_threshold)  # type: ignore[arg-type]

    # ------------------------------------------------------------------------------------------
    def advance(self, step: int) -> None:
        """Move to ``step`` (monotone) and evict entries older than the window.

        Per-step counters (admitted / rejected / evicted) reset when the step changes.
        """
        step = int(step)
        if self._step is not None and step < self._step:
            raise ValueError(f"steps must not go backwards: current step {self._step}, got {step}")
        if self._step is None or step > self._step:
            self._counters = self._zero_counters()
        self._step = step
        self._evict_expired()

    def push(
        self, step: int, trajectories: Iterable[Trajectory], rejected: int = 0, rng: RngLike = None
    ) -> dict[str, int]:
        """Admit this step's trajectories (after ``advance(step)``); returns {admitted, rejected}.
        ``rejected``: trajectories the caller already filtered out with :meth:`admits_reward`
        (counted as rejected). ``rng`` draws the rows an overflow evicts (a ``numpy.random.Generator``
        or an int seed; None means seed 0). A filled frozen buffer only moves the clock: returns zeros."""
        self.advance(step)
        if not self.accepting:
            return {"admitted": 0, "rejected": 0}
        if self._blocks and self._blocks[-1].step == self._step:
            block = self._blocks[-1]
        else:
            block = _Block(self._step)  # type: ignore[arg-type]
            self._blocks.append(block)
        admitted = 0
        rejected = int(rejected)
        for traj in trajectories:
            if not isinstance(traj, Trajectory):
                raise TypeError(f"push expects Trajectory objects, got {type(traj).__name__}")
            if self.admits(traj):
                block.items.append(traj)
                admitted += 1
            else:
                rejected += 1
        self._size += admitted
        self._count("admitted", admitted)
        self._count("rejected", rejected)
        if not block:
            self._blocks.pop()  # keep no empty tail block
        self._evict_overflow(rng)
        if self.frozen:
            # the fill is the first push that admits anything: under a sparse reward the start model's
            # first step often has no correct answer, and an empty static reference would make the run GRPO
            self._filled = bool(self._size)
            if self._filled:
                logger.info(f"dyjr.buffer.frozen: filled at step {self._step} with {self._size} trajectories; "
                            f"never refreshed from now on")
            else:
                logger.warning(f"dyjr.buffer.frozen: step {self._step} admitted nothing ({rejected} rejected): "
                               f"nothing to replay yet, the fill waits for the next step's rollouts")
        return {"admitted": admitted, "rejected": rejected}

    def sample(self, n: int, rng: RngLike = None) -> list[Trajectory]:
        """Up to ``n`` distinct alive entries, uniformly without replacement.

        ``rng`` is a ``numpy.random.Generator`` (or an int seed; None means seed 0). The result
        depends only on the buffer content (its deterministic insertion order) and the RNG state.
        Fewer than ``n`` alive entries: all of them, in random order.
        """
        gen = _generator(rng)
        k = min(int(n), self._size)
        if k <= 0:
            return []
        idx = gen.choice(self._size, size=k, replace=False)
        blocks = list(self._blocks)
        sizes = np.fromiter((len(b) for b in blocks), dtype=np.int64, count=len(blocks))
        ends = np.cumsum(sizes)
        which = np.searchsorted(ends, idx, side="right")
        local = idx - (ends[which] - sizes[which])
        return [blocks[b].get(int(i)) for b, i in zip(which.tolist(), local.tolist())]

    def report_drift(self, drift: Optional[float]) -> int:
        """Feed the adaptive-window rule one drift measurement; returns the (new) window."""
        if self._drift_window.report(drift) and self._step is not None:  # shrunk: evict what fell out
            self._evict_expired()
        return self._drift_window.size

    # ------------------------------------------------------------------------------------------
    def _evict_expired(self) -> None:
        assert self._step is not None
        if self.frozen:  # a static reference never ages out
            return
        horizon = self._step - self._drift_window.size  # entries with s < horizon have age > W
        while self._blocks and self._blocks[0].step < horizon:
            block = self._blocks.popleft()
            n = len(block)
            self._size -= n
            self._count("evicted_age", n)

    def _evict_overflow(self, rng: RngLike = None) -> None:
        cap = self.capacity
        while cap is not None and self._size > cap:
            block = self._blocks[0]
            excess = min(self._size - cap, len(block))
            if excess == len(block):  # the whole oldest step goes
                self._blocks.popleft()
            else:  # part of it: a random subset (kept rows stay in push order)
                alive = block.alive()
                keep = np.sort(_generator(rng).choice(len(alive), size=len(alive) - excess, replace=False))
                block.items = [alive[i] for i in keep.tolist()]
            self._size -= excess
            self._count("evicted_capacity", excess)

    # ------------------------------------------------------------------------------------------
    def ages(self) -> np.ndarray:
        """Age of every alive entry, oldest first (empty before the first step)."""
        if self._step is None:
            return np.zeros(0, dtype=np.int64)
        return np.concatenate(
            [np.full(len(b), self._step - b.step, dtype=np.int64) for b in self._blocks] or [np.zeros(0, np.int64)]
        )

    def nbytes(self) -> int:
        """Bytes held by the stored entries' arrays and records (what ``plan`` estimates as
        ``stored_row_bytes`` per row; Python object overhead excluded). A record's tensors count
        with their whole storage, so a view pinning a larger buffer would show."""
        return sum(_nbytes(getattr(t, name)) for t in self for name in (*Trajectory._ARRAYS, "record"))

    def metrics(self, prefix: str = "buffer/") -> dict[str, float]:
        """Size, ages, this step's admission/eviction counts, window and last drift."""
        n = self._size
        if n and self._step is not None:
            age_sum = sum((self._step - b.step) * len(b) for b in self._blocks)
            age_mean = age_sum / n
            age_max = float(self._step - self._blocks[0].step)
        else:
            age_mean = age_max = 0.0
        c = self._counters
        out = {
            "size": float(n),
            "window": float(self._drift_window.size),
            "age_mean": float(age_mean),
            "age_max": age_max,
            "admitted": float(c["admitted"]),
            "rejected": float(c["rejected"]),
            "evicted": float(c["evicted_age"] + c["evicted_capacity"]),
            "evicted_age": float(c["evicted_age"]),
            "evicted_capacity": float(c["evicted_capacity"]),
            "admitted_total": float(self._totals["admitted"]),
            "evicted_total": float(self._totals["evicted_age"] + self._totals["evicted_capacity"]),
        }
        if self.capacity is not None:
            out["capacity"] = float(self.capacity)
        if self._drift_window.last_drift is not None:
            out["drift"] = float(self._drift_window.last_drift)
        return {prefix + k: v for k, v in out.items()}

    def state_dict(self) -> dict[str, Any]:
        """Picklable pure python/numpy snapshot (arrays are shared, not copied)."""
        return {
            "version": _STATE_VERSION,
            "config": self.config.to_dict(),
            "step": self._step,
            **self._drift_window.state_dict(),
            "counters": dict(self._counters),
            "totals": dict(self._totals),
            "blocks": [(b.step, [t.to_dict() for t in b.alive()]) for b in self._blocks],
            "filled": self._filled,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a snapshot. The *current* config wins: the window is clipped to its
        [min_age, max_age] (fixed: max_age) and age/capacity limits are re-applied, so resuming
        with the same config is an exact round trip and with a smaller one just evicts."""
        if state.get("version") != _STATE_VERSION:
            raise ValueError(f"buffer state version {state.get('version')!r}, this buffer reads version {_STATE_VERSION}")
        saved_frozen = bool(state.get("config", {}).get("frozen", False))
        if saved_frozen != self.frozen:  # a frozen fill is not a FIFO window, nor the reverse
            raise ValueError(f"buffer state saved with dyjr.buffer.frozen={str(saved_frozen).lower()}, resumed with "
                             f"{str(self.frozen).lower()}: resume with the setting the run started with")
        self._blocks = deque()
        self._size = 0
        for step, items in state["blocks"]:
            trajs = [Trajectory.from_dict(dict(d)) for d in items]
            if trajs:
                self._blocks.append(_Block(int(step), trajs))
                self._size += len(trajs)
        self._step = None if state["step"] is None else int(state["step"])
        self._drift_window.load_state_dict(state)
        self._counters = {**self._zero_counters(), **state["counters"]}
        self._totals = {**self._zero_counters(), **state["totals"]}
        self._filled = bool(state.get("filled", False))
        if self._step is not None:
            self._evict_expired()
        self._evict_overflow()


_DIGEST_ARRAYS = ("prompt_ids", "response_ids", "response_mask", "logprobs")


def buffer_digest(state: dict[str, Any]) -> str:
    """Content digest of a :meth:`TimeSensitiveBuffer.state_dict`: its step and window and, per
    block in order, every trajectory's identity, reward and token/log-prob arrays (pickled bytes
    are not comparable across processes)."""
    h = hashlib.sha256()
    h.update(repr((state.get("step"), state.get("window"))).encode())
    for block_step, trajectories in state.get("blocks", []):
        h.update(repr(block_step).encode())
        for t in trajectories:
            h.update(repr((t["uid"], int(t["step"]), float(t["reward"]))).encode())
            for key in _DIGEST_ARRAYS:
                arr = np.ascontiguousarray(np.asarray(t[key]))
                h.update(str(arr.dtype).encode() + arr.tobytes())
    return h.hexdigest()[:16]
