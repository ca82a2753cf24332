"""Where replayed rows go in verl's actor update (mini-batch layout): the one computation shared by
the trainers, the start-up check and ``python -m dyjr_verl plan``. Pure functions.

verl splits the update batch into mini-batches (one optimizer step each) and every dp rank's part
of a mini-batch into micro-batches of ``ppo_micro_batch_size_per_gpu`` rows, and asserts that they
divide evenly (``prepare_micro_batches``). Replayed rows added to a mini-batch must therefore come
in multiples of ``dp x micro`` (``dp`` with token-sized micro-batches, ``use_dynamic_bsz``).
Flooring the configured share to that multiple used to give *zero* replay at cluster scale
(512 x 16 rows, mini-batch 64 prompts, 64 ranks x micro 4: 128 wanted per mini-batch, multiple 256);
here the count is rounded to the *nearest* multiple and never to zero while rows are wanted, and a
placement more than :data:`MAX_SHARE_DISTORTION` away from the configured share is refused.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Sequence

#: a placement whose replay share is more than this factor above or below the configured one is an
#: error (``plan`` and the start-up check say which setting to change); within it, a warning.
MAX_SHARE_DISTORTION = 2.0
#: relative share deviation above which ``plan`` and the start-up check warn
WARN_SHARE_DEVIATION = 0.10


def training_micro_batch(actor: Any, dp: int) -> int:
    """Rows per training micro-batch on one rank; 1 with token-sized micro-batches. verl still
    accepts the deprecated global ``ppo_micro_batch_size`` and divides it by dp."""
    if actor.get("use_dynamic_bsz", False):
        return 1
    per_gpu = actor.get("ppo_micro_batch_size_per_gpu")
    if per_gpu:
        return int(per_gpu)
    total = actor.get("ppo_micro_batch_size")
    return max(1, int(total) // dp) if total else 0


def forward_row_multiple(config: Any, dp: int, *, use_reference: bool) -> int:
    """Rows of a log-prob forward (old / ref log-probs) must split into whole micro-batches on every
    rank (``prepare_micro_batches`` asserts it) unless micro-batches are sized by tokens."""
    cfg = config.actor_rollout_ref
    if cfg.actor.get("use_dynamic_bsz", False):
        return dp
    micro = int(cfg.rollout.get("log_prob_micro_batch_size_per_gpu") or 1)
    if use_reference and not cfg.ref.get("log_prob_use_dynamic_bsz", False):
        micro = math.lcm(micro, int(cfg.ref.get("log_prob_micro_batch_size_per_gpu") or 1))
    return dp * micro


@dataclass(frozen=True)
class UpdateShape:
    """What verl's actor update splitting depends on."""

    fresh_rows: int  # train_batch_size x rollout.n, padded by verl to a multiple of the mini-batch
    minibatch_rows: int  # ppo_mini_batch_size x rollout.n (fresh rows of one optimizer step)
    dp: int  # actor data-parallel ranks
    micro: int  # ppo_micro_batch_size_per_gpu; 1 with use_dynamic_bsz (token-sized micro-batches)

    @property
    def row_multiple(self) -> int:
        return self.dp * self.micro

    @property
    def num_minibatches(self) -> int:
        return self.fresh_rows // self.minibatch_rows if self.minibatch_rows else 0

    def problems(self) -> list[str]:
        """verl's own splitting rules for the fresh rows (it would assert on them later)."""
        out = []
        if self.minibatch_rows <= 0:
            out.append(f"actor.ppo_mini_batch_size x rollout.n = {self.minibatch_rows} rows")
        elif self.minibatch_rows % self.row_multiple:
            out.append(f"a mini-batch of {self.minibatch_rows} rows does not split into {self.dp} ranks x "
                       f"micro-batches of {self.micro} (ppo_mini_batch_size x n must be a multiple of "
                       f"{self.row_multiple})")
        return out


@dataclass(frozen=True)
class ReplayPlacement:
    """Replay rows of one step, equal in every mini-batch (verl's split needs equal mini-batches)."""

    target_rows: int  # what the configured share asks for
    per_minibatch: int
    num_minibatches: int
    row_multiple: int
    fresh_rows: int

    @property
    def rows(self) -> int:
        return self.per_minibatch * self.num_minibatches

    @property
    def share(self) -> float:
        """Replay rows per fresh row, as configured shares are stated."""
        return self.rows / self.fresh_rows if self.fresh_rows else 0.0

    @property
    def distortion(self) -> float:
        """Placed / wanted rows (1.0 = exact; inf when rows are wanted but none can be placed)."""
        if self.target_rows == 0:
            return 1.0 if self.rows == 0 else math.inf
        return self.rows / self.target_rows

    def problems(self) -> tuple[list[str], list[str]]:
        """(errors, warnings) about this placement, one line each."""
        if self.target_rows == 0:
            return [], []
        fix = ("set actor.use_dynamic_bsz=true (then the multiple is dp), lower "
               "ppo_micro_batch_size_per_gpu, or change the replay size")
        got = (f"{self.rows} replay rows per step ({self.per_minibatch} per mini-batch x {self.num_minibatches}, "
               f"multiples of dp x micro = {self.row_multiple}) for {self.target_rows} wanted")
        d = self.distortion
        if not (1 / MAX_SHARE_DISTORTION <= d <= MAX_SHARE_DISTORTION):
            return [f"no replay placement within {MAX_SHARE_DISTORTION:g}x of the configured share: {got}; {fix}"], []
        if abs(d - 1.0) > WARN_SHARE_DEVIATION:
            return [], [f"replay share {self.share:.3f} instead of {self.target_rows / self.fresh_rows:.3f}: {got}"]
        return [], []

    def to_dict(self) -> dict:
        return {**asdict(self), "rows": self.rows, "share": self.share}


def place_replay_rows(target_rows: int, shape: UpdateShape, available: int | None = None) -> ReplayPlacement:
    """Replay rows per mini-batch: the multiple of ``dp x micro`` nearest to an equal share of
    ``target_rows``, at least one multiple while any row is wanted, and no more than ``available``
    (rows the store can give this step) allows."""
    num_mb, multiple = shape.num_minibatches, shape.row_multiple
    per_mb = 0
    if target_rows > 0 and num_mb > 0:
        k = max(1, math.floor(target_rows / (num_mb * multiple) + 0.5))
        if available is not None:
            k = min(k, available // (num_mb * multiple))
        per_mb = k * multiple
    return ReplayPlacement(target_rows=int(target_rows), per_minibatch=per_mb, num_minibatches=num_mb,
                           row_multiple=multiple, fresh_rows=shape.fresh_rows)


def plan_minibatches(
    fresh_rows: int, total_rows: int, *, rows_per_minibatch: int, row_multiple: int, batch_multiple: int = 1,
    keep_minibatch_rows: bool = False,
) -> tuple[int, int]:
    """(optimizer steps, rows per mini-batch) for a step with replayed rows inside the groups.

    Default: as many optimizer steps as verl takes on the fresh rows
    (``ceil(fresh_rows / rows_per_minibatch)``), each mini-batch grown to hold ``total_rows``.
    ``keep_minibatch_rows``: the replayed rows add optimizer steps, as many as mini-batches of
    ``rows_per_minibatch`` rows need (the official RLEP code: 512 x 18 rows in mini-batches of
    64 x 16 = 9 steps), each holding an even share of the rows.
    Rows per mini-batch are rounded up to a multiple of ``row_multiple`` (dp x training micro-batch)
    and the whole batch to a multiple of ``batch_multiple`` (the log-prob passes' split); verl pads
    to steps x rows with no-op rows.
    """
    if keep_minibatch_rows:
        # as many steps as mini-batches of rows_per_minibatch rows hold, the rows then shared evenly
        # by those steps (not a last step of a few real rows and the padding)
        steps = max(1, math.ceil(total_rows / rows_per_minibatch))
    else:
        steps = max(1, math.ceil(fresh_rows / rows_per_minibatch))
    rows = row_multiple * math.ceil(total_rows / (steps * row_multiple))
    while (steps * rows) % batch_multiple:
        rows += row_multiple
    return steps, rows


def update_order(fresh_rows: int, replay_rows: int, *, dp: int, num_minibatches: int) -> list[tuple[bool, int]]:
    """The row order handed to ``update_actor`` when replayed rows join at the update: per dp rank
    (verl's contiguous chunks), per mini-batch, its fresh rows then its replayed rows, so every
    optimizer step sees both. Entries are (is_replay, index into the fresh or the replayed rows)."""
    if fresh_rows % (dp * num_minibatches) or replay_rows % (dp * num_minibatches):
        raise ValueError(f"{fresh_rows} fresh and {replay_rows} replayed rows do not split into {dp} ranks x "
                         f"{num_minibatches} equal mini-batches")
    fresh_chunk, fresh_per = fresh_rows // dp, fresh_rows // dp // num_minibatches
    rep_chunk, rep_per = replay_rows // dp, replay_rows // dp // num_minibatches
    order: list[tuple[bool, int]] = []
    for d in range(dp):
        for j in range(num_minibatches):
            order += [(False, d * fresh_chunk + j * fresh_per + i) for i in range(fresh_per)]
            order += [(True, d * rep_chunk + j * rep_per + i) for i in range(rep_per)]
    return order


def spread_rows(kinds: Sequence[int], dp: int, num_minibatches: int) -> list[int]:
    """A row order that keeps each of the ``dp`` contiguous rank chunks (verl's dp split) and, inside
    a chunk, deals the rows of every non-zero kind (replayed rows, our padding rows; a bool is a
    kind) evenly over its ``num_minibatches`` contiguous mini-batches (verl's split with
    ``actor.shuffle=False``), fresh rows (kind 0) filling the rest. Row order is otherwise kept, so
    no mini-batch ends up with the step's padding and only a few real rows."""
    n = len(kinds)
    if n % dp or (n // dp) % num_minibatches:
        raise ValueError(f"{n} rows do not split into {dp} ranks x {num_minibatches} equal mini-batches")
    chunk, per = n // dp, n // dp // num_minibatches
    order: list[int] = []
    for d in range(dp):
        idx = range(d * chunk, (d + 1) * chunk)
        # kind by kind, round robin: each kind spreads evenly and no mini-batch overflows
        special = [i for kind in sorted({int(kinds[i]) for i in idx} - {0}) for i in idx if kinds[i] == kind]
        dealt: list[list[int]] = [[] for _ in range(num_minibatches)]
        for t, i in enumerate(special):
            dealt[t % num_minibatches].append(i)
        fresh = [i for i in idx if not kinds[i]]
        f = 0
        for rows in dealt:
            room = per - len(rows)
            order += rows + fresh[f : f + room]
            f += room
    return order
