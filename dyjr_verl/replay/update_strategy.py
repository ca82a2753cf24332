"""Strategy 1: stored rows join the step at the actor update, outside every advantage.

:class:`ReplayTrainer` overrides one stage of verl's v1 trainer, ``_update_actor``; everything
else (rollout, reward, balancing, old log-probs, advantages, validation, checkpoint cadence) is
verl's own. Per training step (:func:`replay_at_update`, against any TransferQueue client):

1. read back, for this step's rows, only what the plan needs: ``response_mask``, ``rm_scores`` and
   the recorded log-probs, and one whole row as the template of the field layout;
2. draw rows from the method's store (ages >= 1: this step's rollouts are not in it yet), place
   them in the mini-batches (:mod:`.layout`) and write them under fresh keys, rebuilt from their
   compact copies by the codec (:func:`~dyjr_verl.replay.codec.build_row`);
3. write the loss's fields (:func:`~dyjr_verl.replay.rows.loss_fields`) on every row, in update
   order, in one put, and hand verl's ``_update_actor`` the enlarged batch: fresh and replayed rows
   interleaved per mini-batch, as many optimizer steps as without replay (the mini-batch grows); a
   method's per-row record (e.g. DyJR's top-k) is written jagged, at each replayed row's length,
   and empty on fresh rows, which never read it;
4. clear the replayed rows; then read the tokens (and a method's record) of the fresh rows the
   store admits, and of those only, and store one compact copy of each (:func:`store_fresh_rows`).

The original batch is returned, so verl's metrics, sample counts and end-of-step clearing never
see the replayed rows. A replayed row carries its recorded log-probs as ``old_log_probs`` /
``rollout_log_probs`` and zeros in the per-token fields the loss masks out on replay rows
(:data:`MASKED_ON_REPLAY_ROWS`); any other field of the template is refused by the codec.
"""

from __future__ import annotations

import verl.trainer.ppo.v1  # noqa: F401, I001  (first: see dyjr_verl/plugin.py)
import contextlib
import logging
import os
from dataclasses import dataclass, field
from typing import Any, ClassVar, Iterator, Optional, Sequence

import numpy as np
import torch
import transfer_queue
from tensordict import TensorDict
from transfer_queue import KVBatchMeta

from dyjr_verl import plugin
from dyjr_verl.replay.base import ReplayTrainerBase
from dyjr_verl.replay.codec import build_row, replay_tag, rows_to_td, td_column, td_to_rows, temporary_rows
from dyjr_verl.replay.layout import ReplayPlacement, UpdateShape, place_replay_rows, update_order
from dyjr_verl.replay.rows import RECORDED_LOG_PROBS_KEYS, Trajectory, loss_fields

logger = logging.getLogger(__name__)
logger.setLevel(os.getenv("VERL_LOGGING_LEVEL", "INFO"))

#: per-token fields a replayed row needs only as finite placeholders: the loss masks them out on
#: replay rows (zeros), e.g. verl's ``ppo_loss`` reads ``advantages`` of every row
MASKED_ON_REPLAY_ROWS = ("advantages", "returns", "ref_log_prob", "entropy", "log_probs", "values")


@dataclass
class UpdateRows:
    """One actor update with replayed rows: the batch handed to verl and what the store needs after."""

    meta: KVBatchMeta  # fresh + replayed rows in update order, fields = what every row carries
    minibatch_rows: int
    placement: ReplayPlacement
    drawn: list[Trajectory]
    replay_keys: list[str]
    recorded: list[torch.Tensor]  # per fresh row
    rewards: list[float]  # per fresh row
    metrics: dict[str, float] = field(default_factory=dict)


class UpdateReplayMethod:
    """What the update strategy asks of a method (:class:`ReplayTrainer` forwards to its store)."""

    def target_replay_rows(self, fresh_rows: int) -> int:
        raise NotImplementedError

    def draw_rows(self, n: int) -> list[Trajectory]:
        raise NotImplementedError

    def admits(self, reward: float) -> bool:
        raise NotImplementedError

    def store_rows(self, step: int, trajectories: list[Trajectory], rejected: int) -> dict[str, float]:
        raise NotImplementedError

    # a per-row record that travels with each trajectory (none by default): read for the admitted
    # rows only, written back on replayed rows only
    def record_read_fields(self) -> list[str]:
        return []

    def take_records(self, data: TensorDict) -> Optional[list]:
        """One record per row of ``data`` (the admitted rows, read with :meth:`record_read_fields`)."""
        return None

    def record_fields(self, records: list) -> dict[str, torch.Tensor]:
        """The per-row fields of the update, in update order: a replayed row's record, None for a fresh row."""
        return {}

    def dropped_field(self, name: str) -> bool:
        """Fields of the step that the update must not see (e.g. a record's raw per-token outputs)."""
        return False

    # values of the admitted rows only (read when they are stored) that travel with each trajectory
    def admitted_read_fields(self) -> list[str]:
        return []

    def admitted_record(self, record: Any, fields: dict[str, torch.Tensor]) -> Any:
        """The stored ``Trajectory.record`` of one admitted row: its :meth:`take_records` record (or
        None) and its :meth:`admitted_read_fields` values."""
        return record

    def replay_per_token(self, traj: Trajectory) -> dict[str, torch.Tensor]:
        """Per-token values of a replayed row that replace its zero placeholders
        (:data:`MASKED_ON_REPLAY_ROWS`), e.g. an advantage stored with the trajectory."""
        return {}

    def recorded_log_probs_key(self) -> Optional[str]:
        """The field stored as each token's log-prob (a method's setting, e.g. ``dyjr.buffer.logprobs``);
        None: the first of :data:`RECORDED_LOG_PROBS_KEYS` the step has."""
        return None


def _recorded_key(fields: Sequence[str], wanted: Optional[str] = None) -> str:
    if wanted is None:
        return next(k for k in RECORDED_LOG_PROBS_KEYS if k in fields)
    if wanted not in fields:  # the start-up check refuses configs without it; never store another field instead
        raise KeyError(f"the step's rows have no '{wanted}' field to store as the recorded log-probs "
                       f"(they have {sorted(fields)})")
    return wanted


def _tensor_fields(template: TensorDict, method: UpdateReplayMethod) -> list[str]:
    return [k for k in template.keys() if isinstance(template.get(k), torch.Tensor) and not method.dropped_field(k)]


def replay_row(template: dict[str, Any], traj: Trajectory, values: Optional[dict[str, torch.Tensor]] = None) -> tuple[dict, dict]:
    """A stored trajectory as a row of the template's layout (recorded log-probs; zero advantage
    unless ``values`` gives per-token values of the placeholder fields)."""
    stored = torch.from_numpy(traj.logprobs)
    per_token = {k: torch.zeros_like(stored) for k in MASKED_ON_REPLAY_ROWS if k in template}
    per_token.update({k: v for k, v in (values or {}).items() if k in per_token})
    if "old_log_probs" in template:
        per_token["old_log_probs"] = stored
    row = build_row(template, traj.response_ids, prompt_ids=traj.prompt_ids, response_mask=traj.response_mask,
                    score=traj.reward, rollout_log_probs=stored, per_token=per_token, keep_non_tensor=False)
    return row, replay_tag(traj.tags, len(traj.prompt_ids), len(traj.response_ids))


@contextlib.contextmanager
def replay_at_update(
    client: Any, batch: KVBatchMeta, method: UpdateReplayMethod, shape: UpdateShape, *, shuffle: bool, prefix: str = "replay"
) -> Iterator[UpdateRows]:
    """Steps 1-3 of the module docstring; the replayed rows are cleared when the block ends."""
    pid = batch.partition_id
    first = client.kv_batch_get(keys=batch.keys[:1], partition_id=pid)  # the layout of a row of this step
    names = list(first.keys())
    lp_key = _recorded_key(names, method.recorded_log_probs_key())
    # verl's token-mean counts loss_mask (rejection sampling zeroes rejected tokens in response_mask
    # only); a step without one is normalised by response_mask (verl's padding conversion copies it)
    loss_key = "loss_mask" if "loss_mask" in names else "response_mask"
    data = client.kv_batch_get(keys=batch.keys, partition_id=pid,
                               select_fields=list(dict.fromkeys(["response_mask", loss_key, "rm_scores", lp_key])))
    recorded = [r.float() for r in data[lp_key].unbind(0)]
    tokens = [int(m.sum()) for m in data["response_mask"].unbind(0)]
    loss_tokens = [int(m.sum()) for m in data[loss_key].unbind(0)]
    rewards = [float(r.float().sum()) for r in data["rm_scores"].unbind(0)]
    real = [not tag.get("is_padding", False) for tag in batch.tags]

    placement = place_replay_rows(method.target_replay_rows(sum(real)), shape)
    drawn = method.draw_rows(placement.rows) if placement.rows else []
    if len(drawn) < placement.rows:  # the store holds fewer rows than planned (early steps)
        placement = place_replay_rows(placement.target_rows, shape, available=len(drawn))
        if len(drawn) > placement.rows:  # drawn rows the layout's multiple cannot place: said, not dropped quietly
            logger.warning("%s: the store gave %d of the %d planned replay rows; equal mini-batches of whole "
                           "multiples (%d x %d rows) place %d of them this step (%s/rows < %s/target_rows)", prefix,
                           len(drawn), placement.target_rows, placement.num_minibatches, placement.row_multiple,
                           placement.rows, prefix, prefix)
        drawn = drawn[: placement.rows]
    order = update_order(len(batch), len(drawn), dp=shape.dp, num_minibatches=shape.num_minibatches)

    like = first.select(*_tensor_fields(first, method))
    template = td_to_rows(like)[0]
    rows = [replay_row(template, t, method.replay_per_token(t)) for t in drawn]
    replay_td = rows_to_td([r for r, _ in rows], like) if rows else None
    with contextlib.ExitStack() as stack:
        replay_keys: list[str] = []
        if rows:
            replay_keys = stack.enter_context(temporary_rows(client, pid, replay_td, [t for _, t in rows], prefix=prefix))
        keys = [replay_keys[i] if rep else batch.keys[i] for rep, i in order]
        tags = [rows[i][1] if rep else batch.tags[i] for rep, i in order]
        fields = loss_fields(
            [rep for rep, _ in order], [drawn[i].num_tokens if rep else tokens[i] for rep, i in order],
            [torch.from_numpy(drawn[i].logprobs) if rep else recorded[i] for rep, i in order],
            mini_batch_size=shape.minibatch_rows + placement.per_minibatch, dp_size=shape.dp, shuffle=shuffle,
            loss_tokens=[drawn[i].num_tokens if rep else loss_tokens[i] for rep, i in order],
        )
        if drawn and method.record_read_fields():  # a replayed row carries its record, a fresh row an empty one
            fields.update(method.record_fields([drawn[i].record if rep else None for rep, i in order]))
        client.kv_batch_put(keys=keys, partition_id=pid, fields=TensorDict(fields, batch_size=[len(keys)]))
        base = list(replay_td.keys()) if rows else [k for k in (batch.fields or names) if not method.dropped_field(k)]
        meta = KVBatchMeta(partition_id=pid, keys=keys, tags=tags, fields=base + [k for k in fields if k not in base],
                           extra_info=dict(batch.extra_info or {}))
        yield UpdateRows(meta=meta, minibatch_rows=shape.minibatch_rows + placement.per_minibatch, placement=placement,
                         drawn=drawn, replay_keys=replay_keys, recorded=recorded, rewards=rewards)


def store_fresh_rows(client: Any, batch: KVBatchMeta, update: UpdateRows, method: UpdateReplayMethod, step: int) -> dict[str, float]:
    """Step 4: one compact copy of each admitted fresh row (tokens read for those rows only)."""
    real = [not tag.get("is_padding", False) for tag in batch.tags]
    admitted = [i for i, ok in enumerate(real) if ok and method.admits(update.rewards[i])]
    trajectories = []
    if admitted:
        extra = method.admitted_read_fields()
        names = ["prompts", "responses", "response_mask", "uid", *method.record_read_fields(), *extra]
        data = client.kv_batch_get(keys=[batch.keys[i] for i in admitted], partition_id=batch.partition_id,
                                   select_fields=list(dict.fromkeys(names)))
        records = method.take_records(data)  # the admitted rows' records only
        extra_columns = {k: data[k].unbind(0) for k in extra}
        extra_rows = [{k: column[j] for k, column in extra_columns.items()} for j in range(len(admitted))]
        columns = zip(admitted, td_column(data, "uid"), data["prompts"].unbind(0), data["responses"].unbind(0),
                      data["response_mask"].unbind(0), extra_rows, strict=True)
        for j, (i, uid, prompt, response, mask, values) in enumerate(columns):
            record = None if records is None else records[j]
            trajectories.append(Trajectory(
                prompt_ids=prompt, response_ids=response, response_mask=mask,
                logprobs=update.recorded[i], reward=update.rewards[i], uid=str(uid), step=step, tags=batch.tags[i],
                record=method.admitted_record(record, values) if extra else record,
            ))
    return method.store_rows(step, trajectories, rejected=sum(real) - len(admitted))


class ReplayTrainer(ReplayTrainerBase, UpdateReplayMethod):
    """Replayed rows join at ``_update_actor`` (module docstring); a method fills the hooks of
    :class:`UpdateReplayMethod` and :class:`~dyjr_verl.replay.base.ReplayTrainerBase`."""

    #: the TransferQueue client (verl's module; tests hand an in-memory stand-in)
    tq: ClassVar[Any] = transfer_queue

    def before_update(self, step: int) -> None:
        """Called first in every update with replay on (e.g. the store's clock)."""

    def after_update(self, update: UpdateRows, metrics: dict) -> None:
        """Called after verl's update with its metrics (e.g. the loss's drift for the store)."""

    def _update_actor(self, batch: KVBatchMeta, metrics: dict) -> KVBatchMeta:
        if not self.replay_enabled():
            return super()._update_actor(batch, metrics)
        step = int(self.global_steps)
        self.before_update(step)
        shape = self._update_shape(len(batch))
        shuffle = bool(self.config.actor_rollout_ref.actor.shuffle)
        with replay_at_update(self.tq, batch, self, shape, shuffle=shuffle) as update:
            with self._mini_batch_rows(update.minibatch_rows):
                super()._update_actor(update.meta, metrics)
        self.after_update(update, metrics)
        metrics.update(store_fresh_rows(self.tq, batch, update, self, step))
        drawn = update.drawn
        ages = [step - t.step for t in drawn]
        p = self.metric_prefix
        metrics.update(self.store_metrics())
        metrics.update({
            f"{p}replay/rows": float(len(drawn)),
            f"{p}replay/distinct_rows": float(len({id(t) for t in drawn})),  # < rows: a method reused stored rows
            f"{p}replay/target_rows": float(update.placement.target_rows),
            f"{p}replay/tokens": float(sum(t.num_tokens for t in drawn)),
            f"{p}replay/mean_age": float(np.mean(ages)) if ages else 0.0,
            f"{p}replay/share": len(drawn) / float(len(drawn) + len(batch)),
        })
        return batch


plugin.register_pending(__name__)  # last: see dyjr_verl/plugin.py
