"""The replay row contract: field names the replay-aware loss reads, the per-mini-batch normaliser
fields, and the compact stored row (:class:`Trajectory`) a store keeps per trajectory.

Fields the trainer writes on EVERY row of an actor-update batch (fresh rows and verl's padding rows
included; the ``KVBatchMeta`` handed to the update must list them in ``fields``):

======================================  ===================  =====================================
field                                   dtype / layout       meaning
======================================  ===================  =====================================
``replay_mask``                         float32, dense (B,)  1.0 replay row, 0.0 fresh row
                                                             (> 0.5 = replay)
``stored_log_probs``                    float, jagged,       log-prob of each response token
                                        response length      recorded when the row was *sampled*;
                                                             fresh rows: their recorded log-probs
                                                             (unused by the loss)
``fresh_tokens_in_minibatch``           float64, dense (B,)  per-mini-batch counts
``fresh_response_tokens_in_minibatch``                       (:func:`minibatch_normalizer_fields`);
``replay_tokens_in_minibatch``                               float64: exact (float32 is exact only
``fresh_seqs_in_minibatch``                                  up to 2^24 tokens)
``replay_seqs_in_minibatch``
======================================  ===================  =====================================

:func:`loss_fields` builds all of them for a batch in update order, in one place.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import numpy as np
import torch

__all__ = [
    "REPLAY_MASK_KEY",
    "STORED_LOG_PROBS_KEY",
    "FRESH_TOKENS_KEY",
    "FRESH_RESPONSE_TOKENS_KEY",
    "REPLAY_TOKENS_KEY",
    "FRESH_SEQS_KEY",
    "REPLAY_SEQS_KEY",
    "NORMALIZER_KEYS",
    "RECORDED_LOG_PROBS_KEYS",
    "Trajectory",
    "minibatch_normalizer_fields",
    "loss_fields",
]

REPLAY_MASK_KEY = "replay_mask"
STORED_LOG_PROBS_KEY = "stored_log_probs"
#: fresh tokens as verl's token-mean counts them (sum of ``loss_mask``: rollout rejection sampling
#: zeroes rejected tokens in ``response_mask`` only, so they stay in the denominator)
FRESH_TOKENS_KEY = "fresh_tokens_in_minibatch"
#: fresh tokens the policy-gradient terms and their diagnostics average over (sum of ``response_mask``)
FRESH_RESPONSE_TOKENS_KEY = "fresh_response_tokens_in_minibatch"
REPLAY_TOKENS_KEY = "replay_tokens_in_minibatch"
FRESH_SEQS_KEY = "fresh_seqs_in_minibatch"
REPLAY_SEQS_KEY = "replay_seqs_in_minibatch"
#: every per-mini-batch count field
NORMALIZER_KEYS = (FRESH_TOKENS_KEY, FRESH_RESPONSE_TOKENS_KEY, REPLAY_TOKENS_KEY, FRESH_SEQS_KEY, REPLAY_SEQS_KEY)
#: where a row's sampling-time log-probs are, in order of preference: vLLM's, else verl's old log-probs
RECORDED_LOG_PROBS_KEYS = ("rollout_log_probs", "old_log_probs")


def _array(x: Any, name: str, *, float32: bool = False) -> np.ndarray:
    """A 1-D numpy *copy* of a list / numpy array / CPU tensor (a view would pin the whole step's
    TransferQueue buffer that a row was unbound from)."""
    if isinstance(x, torch.Tensor):
        if x.device.type != "cpu":
            raise ValueError(f"Trajectory.{name} must live on the CPU (got device {x.device}); call .cpu() first")
        x = x.detach()
        if float32 or x.dtype in (torch.bfloat16, torch.float16):
            x = x.float()
        x = x.numpy()
    arr = np.array(x, dtype=np.float32 if float32 else None, copy=True)
    if arr.ndim != 1:
        raise ValueError(f"Trajectory.{name} must be 1-D, got shape {arr.shape}")
    return arr


@dataclass(eq=False)
class Trajectory:
    """One stored rollout, compact: the tokens, the response mask, the sampling policy's log-prob of
    each response token (``logprobs[j]`` for ``response_ids[j]``), its reward, group id and step,
    its TransferQueue tags, and an optional method ``record`` (DyJR's top-k record) the store never
    reads. Arrays are private numpy copies; treat a stored trajectory as read-only."""

    prompt_ids: Any
    response_ids: Any
    response_mask: Any
    logprobs: Any
    reward: float
    uid: str
    step: int
    tags: dict = field(default_factory=dict)
    record: Any = None

    def __post_init__(self) -> None:
        self.prompt_ids = _array(self.prompt_ids, "prompt_ids")
        self.response_ids = _array(self.response_ids, "response_ids")
        self.response_mask = _array(self.response_mask, "response_mask")
        self.logprobs = _array(self.logprobs, "logprobs", float32=True)
        n = len(self.response_ids)
        if len(self.response_mask) != n or len(self.logprobs) != n:
            raise ValueError(
                f"Trajectory {self.uid!r}: response_ids ({n}), response_mask ({len(self.response_mask)}) "
                f"and logprobs ({len(self.logprobs)}) must have the same length"
            )
        self.reward = float(self.reward)
        self.step = int(self.step)
        self.uid = str(self.uid)
        self.tags = dict(self.tags or {})

    @property
    def num_tokens(self) -> int:
        """Valid response tokens (sum of the response mask)."""
        return int(np.count_nonzero(self.response_mask))

    _ARRAYS = ("prompt_ids", "response_ids", "response_mask", "logprobs")

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Trajectory):
            return NotImplemented
        same_arrays = all(
            getattr(self, a).dtype == getattr(other, a).dtype and np.array_equal(getattr(self, a), getattr(other, a))
            for a in self._ARRAYS
        )
        same_reward = self.reward == other.reward or (math.isnan(self.reward) and math.isnan(other.reward))
        return (same_arrays and same_reward and (self.uid, self.step) == (other.uid, other.step)
                and _equal(self.tags, other.tags) and _equal(self.record, other.record))

    __hash__ = None  # type: ignore[assignment]  # mutable container

    def to_dict(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in (*self._ARRAYS, "reward", "uid", "step", "tags", "record")}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Trajectory":
        return cls(**d)


def _equal(a: Any, b: Any) -> bool:
    """Equality of tags / records that may hold arrays or tensors."""
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b))
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and torch.equal(a, b)
    if hasattr(a, "shape") or hasattr(b, "shape"):
        return bool(np.array_equal(np.asarray(a), np.asarray(b)))
    return bool(a == b)


def minibatch_normalizer_fields(
    is_replay: Any,
    num_tokens: Any,
    *,
    mini_batch_size: int,
    dp_size: int = 1,
    shuffle: bool = False,
    loss_tokens: Any = None,
) -> dict[str, torch.Tensor]:
    """The per-row count fields (:data:`NORMALIZER_KEYS`) for a whole actor-update batch, in the
    row order handed to verl's ``update_actor``.

    Args:
        is_replay: (N,) bool/0-1, replay rows.
        num_tokens: (N,) valid response tokens per row (sum of ``response_mask``).
        loss_tokens: (N,) sum of ``loss_mask`` per row, what verl's engine counts for its token-mean
            denominator (``batch_num_tokens``); None when it equals ``num_tokens``.
        mini_batch_size: rows per optimizer mini-batch over all dp ranks
            (``ppo_mini_batch_size * rollout.n``, verl's ``global_batch_size``).
        dp_size: data-parallel size of the actor.
        shuffle: ``actor.shuffle``. False: exact per-mini-batch counts for verl's layout (dp
            contiguous chunks of N/dp rows, each cut into contiguous mini-batches of
            mini_batch_size/dp rows; mini-batch k = the k-th cut of every rank). True: the
            step totals divided by the number of mini-batches, on every row.

    Returns:
        {field name: float64 (N,) tensor}: fresh tokens by ``loss_mask`` (the fresh normaliser) and
        by ``response_mask`` (the weights of the fresh diagnostics), replay tokens by
        ``response_mask``, fresh and replay rows.
    """
    rep = torch.as_tensor(is_replay).reshape(-1).bool()
    tok = torch.as_tensor(num_tokens).reshape(-1).to(torch.float64)
    loss_tok = tok if loss_tokens is None else torch.as_tensor(loss_tokens).reshape(-1).to(torch.float64)
    n = rep.numel()
    if tok.numel() != n or loss_tok.numel() != n:
        raise ValueError(f"is_replay has {n} rows but num_tokens has {tok.numel()} and loss_tokens {loss_tok.numel()}")
    if mini_batch_size < 1 or dp_size < 1 or mini_batch_size % dp_size:
        raise ValueError(f"mini_batch_size ({mini_batch_size}) must be a positive multiple of dp_size ({dp_size})")
    if n % dp_size or (n // dp_size) % (mini_batch_size // dp_size):
        raise ValueError(
            f"{n} rows cannot be split into dp_size={dp_size} chunks of whole mini-batches of {mini_batch_size} rows"
        )
    chunk = n // dp_size
    per_rank = mini_batch_size // dp_size
    num_mb = chunk // per_rank
    fresh = (~rep).to(torch.float64)
    repf = rep.to(torch.float64)
    if shuffle:
        mb = torch.zeros(n, dtype=torch.long)
        num_groups = 1
        div = float(num_mb)
    else:
        mb = (torch.arange(n) % chunk) // per_rank
        num_groups = num_mb
        div = 1.0

    def per_group(values: torch.Tensor) -> torch.Tensor:
        sums = torch.zeros(num_groups, dtype=torch.float64).index_add_(0, mb, values)
        return (sums / div)[mb]

    return {
        FRESH_TOKENS_KEY: per_group(loss_tok * fresh),
        FRESH_RESPONSE_TOKENS_KEY: per_group(tok * fresh),
        REPLAY_TOKENS_KEY: per_group(tok * repf),
        FRESH_SEQS_KEY: per_group(fresh),
        REPLAY_SEQS_KEY: per_group(repf),
    }


def loss_fields(
    is_replay: Sequence[bool],
    num_tokens: Sequence[int],
    stored_log_probs: Sequence[torch.Tensor],
    *,
    mini_batch_size: int,
    dp_size: int,
    shuffle: bool,
    loss_tokens: Optional[Sequence[int]] = None,
) -> dict[str, torch.Tensor]:
    """Every field of the contract for a whole actor-update batch, in update order: the replay
    mask, the recorded log-probs (jagged, fp32) and the count fields (``num_tokens``: sum of
    ``response_mask`` per row; ``loss_tokens``: sum of ``loss_mask``, see
    :func:`minibatch_normalizer_fields`)."""
    if not (len(is_replay) == len(num_tokens) == len(stored_log_probs)):
        raise ValueError(f"{len(is_replay)} rows, {len(num_tokens)} token counts, {len(stored_log_probs)} log-prob rows")
    stored = [torch.as_tensor(lp).float().reshape(-1).contiguous() for lp in stored_log_probs]
    return {
        REPLAY_MASK_KEY: torch.tensor([float(r) for r in is_replay], dtype=torch.float32),
        STORED_LOG_PROBS_KEY: torch.nested.as_nested_tensor(stored, layout=torch.jagged),
        **minibatch_normalizer_fields(is_replay, num_tokens, mini_batch_size=mini_batch_size, dp_size=dp_size,
                                      shuffle=shuffle, loss_tokens=loss_tokens),
    }
