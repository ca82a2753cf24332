"""Strategy 2: replayed trajectories join their prompt's GRPO group before advantages (RLEP, Ex-GRPO).

Replayed rows are appended to a group *before* verl's ``_balance_batch``, so verl balances, pads,
recomputes old log-probs and computes the group advantage over fresh + replayed rows. They share the
group's ``uid`` (GRPO groups by it) under TransferQueue keys with a fresh prefix (verl's replay
buffer groups keys by the prefix before the first ``_``), are scored with verl's reward workers (or
carry a stored score), and leave TransferQueue when the step ends, so ``_compute_metrics`` and the
end-of-step clear see fresh rows only. The optimizer still takes as many steps as GRPO would (the
mini-batch grows), unless the method keeps verl's mini-batch rows (RLEP).

A method implements :meth:`GroupReplayTrainer.plan_group_replay` (which rows join which group this
step) and :meth:`GroupReplayTrainer.after_group_step` (update its store from the finished step);
the pure pieces are in :mod:`.group_rows`.
"""

from __future__ import annotations

import verl.trainer.ppo.v1  # noqa: F401, I001  (first: see dyjr_verl/plugin.py)
import math
from typing import Any, ClassVar, Optional

import numpy as np
import ray
import torch
import transfer_queue
from omegaconf import DictConfig
from tensordict import TensorDict
from transfer_queue import KVBatchMeta
from verl.protocol import DataProto
from verl.trainer.ppo.core_algos import agg_loss
from verl.utils.debug import marked_timer
from verl.utils.debug.metrics import calculate_debug_metrics
from verl.workers.utils.padding import response_from_nested

from dyjr_verl import plugin
from dyjr_verl.replay.base import ReplayTrainerBase
from dyjr_verl.replay.codec import nested, padding_rows, rows_to_td, td_to_rows, temporary_rows
from dyjr_verl.replay.group_rows import (
    GroupStep,
    PromptGroup,
    ReplayRowSpec,
    make_replay_row,
    read_groups,
    remove_group_rows,
    write_group_rows,
    reward_input,
)
from dyjr_verl.replay.layout import plan_minibatches, spread_rows
from dyjr_verl.replay.rows import loss_fields

__all__ = ["GroupReplayTrainer"]


class GroupReplayTrainer(ReplayTrainerBase):
    """Replayed trajectories join their prompt's GRPO group before advantages (module docstring).

    Subclasses implement :meth:`plan_group_replay` (which rows join which group this step) and
    :meth:`after_group_step` (update the store from the finished step; ``step.data`` holds the
    rows' :meth:`step_fields`); everything else — TransferQueue keys and tags, reward scoring,
    mini-batch sizing and padding, fresh-only verl metrics, the replay-aware loss fields, cleanup —
    is here.
    """

    #: the TransferQueue client (verl's module; tests hand an in-memory stand-in)
    tq: ClassVar[Any] = transfer_queue

    #: True: replayed rows add optimizer steps of ppo_mini_batch_size x n rows (official RLEP);
    #: False: verl's step count on the fresh rows, mini-batches grow (dyjr_verl.replay.layout.plan_minibatches)
    keeps_minibatch_rows: ClassVar[bool] = False

    def __init__(self, config: DictConfig):
        self._group_step: Optional[GroupStep] = None
        self._template_cache: dict[str, tuple[dict, dict]] = {}
        self._template_like: Optional[TensorDict] = None
        super().__init__(config)
        if self.use_critic:
            raise ValueError(f"{self.config_node}: group replay needs a critic-free group estimator (e.g. grpo)")

    # -- hooks for subclasses ----------------------------------------------------------------------
    def plan_group_replay(self, groups: list[PromptGroup], metrics: dict) -> list[ReplayRowSpec]:
        raise NotImplementedError

    def after_group_step(self, batch: KVBatchMeta, step: GroupStep, metrics: dict) -> None:
        """Called after the step's actor update with the batch (fresh, replayed and padding rows)."""

    # -- services for subclasses -------------------------------------------------------------------
    def group_templates(self, uids: Any) -> dict[str, tuple[dict, dict]]:
        """uid -> (row, tag) of one fresh row of the group (all fields), fetched once per step."""
        step = self._group_step
        need = [u for u in dict.fromkeys(uids) if u not in self._template_cache]
        if need:
            keys = [step.groups[u].keys[0] for u in need]
            td = self.tq.kv_batch_get(keys=keys, partition_id=step.partition_id)
            self._template_like = td
            for uid, key, row in zip(need, keys, td_to_rows(td), strict=True):
                self._template_cache[uid] = (row, step.tags[key])
        return {u: self._template_cache[u] for u in uids}

    def policy_entropy(self, items: list[tuple[str, torch.Tensor]]) -> list[float]:
        """Mean token entropy of each (group uid, response) under the current policy: one batched
        ``compute_log_prob`` forward over temporary TransferQueue rows built on the group's prompt."""
        if not items:
            return []
        step = self._group_step
        templates = self.group_templates([u for u, _ in items])
        rows, tags = [], []
        for j, (uid, ids) in enumerate(items):
            row, tag = make_replay_row(*templates[uid], ids, score=0.0, session_id=1000 + j)
            rows.append(row)
            tags.append(tag)
        multiple = self._forward_row_multiple(self._actor_dp_size())
        while len(rows) % multiple:  # whole micro-batches on every rank: repeat the last candidate
            rows.append(rows[-1])
            tags.append(tags[-1])
        pid = step.partition_id
        with temporary_rows(self.tq, pid, rows_to_td(rows, self._template_like), tags, prefix=f"{self.config_node}cand") as keys:
            meta = KVBatchMeta(
                partition_id=pid, keys=keys, tags=tags,
                extra_info={"calculate_entropy": True, "compute_loss": False,
                            "temperature": self.config.actor_rollout_ref.rollout.temperature},
            )
            self.actor_rollout_wg.compute_log_prob(meta)
            data = self.tq.kv_batch_get(keys=keys, partition_id=pid, select_fields=["entropy", "response_mask"])
        entropy = response_from_nested(data["entropy"], data["response_mask"])
        means = []
        for ent, mask in zip(entropy.unbind(0), data["response_mask"].unbind(0), strict=True):
            m = mask.float()
            means.append(float((ent.float() * m).sum() / m.sum().clamp(min=1.0)))
        return means[: len(items)]

    # -- verl stages ---------------------------------------------------------------------------------
    def _step_once(self, metrics: dict, timing_raw: dict, sample_batch_size: int) -> KVBatchMeta:
        self._group_step, self._template_cache, self._template_like = None, {}, None
        batch = super()._step_once(metrics, timing_raw, sample_batch_size)
        step, self._group_step = self._group_step, None
        self._template_cache, self._template_like = {}, None
        if step is None:  # replay disabled
            return batch
        with marked_timer("replay_update", timing_raw):
            self.after_group_step(batch, step, metrics)
        rows = len(step.replay_keys)
        p = self.metric_prefix
        metrics.update({
            f"{p}replay/rows": float(rows),
            f"{p}replay/groups": float(len(set(step.replay_uids))),
            f"{p}replay/tokens": float(step.replay_tokens),
            f"{p}replay/share": rows / float(rows + step.fresh_rows) if rows + step.fresh_rows else 0.0,
            f"{p}replay/score_mean": float(np.mean(step.replay_scores)) if step.replay_scores else 0.0,
            f"{p}replay/mini_batch_rows": float(step.mini_rows),
        })
        return remove_group_rows(self.tq, batch, step)

    def _balance_batch(self, batch: KVBatchMeta, metrics, logging_prefix="global_seqlen", keep_minibatch=False):
        if not (self.replay_enabled() and self._group_step is None):
            return super()._balance_batch(batch, metrics, logging_prefix=logging_prefix, keep_minibatch=keep_minibatch)
        with marked_timer("replay_inject", getattr(self, "timing_raw", {})):
            batch = self._inject_group_rows(batch, metrics)
        batch = super()._balance_batch(batch, metrics, logging_prefix=logging_prefix, keep_minibatch=keep_minibatch)
        step = self._group_step
        if step.replay_keys:
            # verl balanced tokens across dp ranks; inside each rank, spread the replayed rows over
            # the optimizer steps (as whole-group mini-batches would), not all in the last one
            kind = {**{k: 1 for k in step.replay_keys}, **{k: 2 for k in step.padding_keys}}
            batch.reorder(spread_rows([kind.get(k, 0) for k in batch.keys], self._actor_dp_size(), step.num_minibatches))
        return batch

    def _get_required_batch_multiple(self, dp_size: int) -> int:
        step = self._group_step
        if step is None or not step.replay_keys:
            return super()._get_required_batch_multiple(dp_size)
        # the planned steps x rows (plan_minibatches), so verl adds no padding of its own
        return math.lcm(dp_size, step.num_minibatches * step.mini_rows)

    def _compute_old_log_prob(self, batch: KVBatchMeta, metrics: dict) -> KVBatchMeta:
        out = super()._compute_old_log_prob(batch, metrics)
        step = self._group_step
        corr = self.config.algorithm.get("rollout_correction", None)
        bypass = bool(corr and corr.get("bypass_mode", False))  # no forward ran: nothing to amend
        if step is not None and step.replay_keys and not bypass:
            self._after_old_log_prob(batch, step, metrics)
        return out

    def _update_actor(self, batch: KVBatchMeta, metrics: dict) -> KVBatchMeta:
        step = self._group_step
        fields = self.step_fields()
        if step is not None and fields:  # one read for the loss fields and the method's after-step hook
            step.data = self.tq.kv_batch_get(keys=batch.keys, partition_id=batch.partition_id, select_fields=fields)
            step.data_keys, step.data_tags = list(batch.keys), list(batch.tags)
        if self.replay_loss_installed:
            batch = self._write_loss_fields(batch, step)
        if step is not None and step.replay_keys:
            with self._mini_batch_rows(step.mini_rows):
                return super()._update_actor(batch, metrics)
        return super()._update_actor(batch, metrics)

    def step_fields(self) -> list[str]:
        """Fields of every row read once before the update (``GroupStep.data``): what the loss
        fields need; a method that needs more in :meth:`after_group_step` adds them."""
        return ["response_mask", "loss_mask", "old_log_probs"] if self.replay_loss_installed else []

    # -- internals -----------------------------------------------------------------------------------
    def _inject_group_rows(self, batch: KVBatchMeta, metrics: dict) -> KVBatchMeta:
        pid = batch.partition_id
        step = self._group_step = read_groups(self.tq, batch)
        groups = step.groups
        specs = self.plan_group_replay(list(groups.values()), metrics)
        if not specs:
            return batch

        templates = self.group_templates([s.uid for s in specs])
        rows, tags = [], []
        next_session = {u: len(g.keys) for u, g in groups.items()}
        for spec in specs:
            row, tag = make_replay_row(
                *templates[spec.uid], spec.response_ids, score=0.0 if spec.score is None else spec.score,
                session_id=next_session[spec.uid], rollout_log_probs=spec.stored_log_probs,
            )
            next_session[spec.uid] += 1
            rows.append(row)
            tags.append(tag)

        to_score = [i for i, s in enumerate(specs) if s.score is None]
        scored = self._score_with_reward_workers([rows[i] for i in to_score]) if to_score else []
        if scored is not None:
            for i, (score, extra) in zip(to_score, scored, strict=True):
                rows[i]["rm_scores"][-1] = score
                if isinstance(rows[i].get("extra_fields"), dict):
                    rows[i]["extra_fields"]["reward_extra_info"] = extra

        step.num_minibatches, step.mini_rows = plan_minibatches(
            step.fresh_rows, step.fresh_rows + len(rows),
            rows_per_minibatch=int(self.config.actor_rollout_ref.actor.ppo_mini_batch_size)
            * int(self.config.actor_rollout_ref.rollout.n),
            row_multiple=self._update_shape(step.fresh_rows).row_multiple,
            batch_multiple=self._forward_row_multiple(self._actor_dp_size()),
            keep_minibatch_rows=self.keeps_minibatch_rows,
        )
        # Fill up to steps x rows ourselves: verl's padding rows are 128-token synthetic sequences,
        # ours reuse a real prompt with one masked-out token (cheaper forwards, same no-op).
        n_pad = step.num_minibatches * step.mini_rows - step.fresh_rows - len(rows)
        pad_rows, pad_tags = padding_rows(*templates[specs[0].uid], n_pad, eos_token_id=self.tokenizer.eos_token_id)

        # fresh key prefixes, never a prompt uid of verl's buffer; cleared in _step_once
        write_group_rows(self.tq, step, rows, tags, pad_rows, pad_tags, like=self._template_like, prefix=self.config_node)
        keys, pad_keys = step.replay_keys, step.padding_keys
        if scored is None:  # a colocated reward model scores batches, not single rows
            need = [keys[i] for i in to_score]
            self._compute_reward_colocate(KVBatchMeta(partition_id=pid, keys=need, tags=[tags[i] for i in to_score]))
            scores = self.tq.kv_batch_get(keys=keys, partition_id=pid, select_fields=["rm_scores"])["rm_scores"].unbind(0)
        else:
            scores = [r["rm_scores"] for r in rows]

        step.replay_uids = [s.uid for s in specs]
        step.replay_scores = [float(r.float().sum()) for r in scores]
        step.replay_tokens = int(sum(int(torch.as_tensor(r["responses"]).numel()) for r in rows))
        step.stored = {k: s.stored_log_probs.float() for k, s in zip(keys, specs) if s.stored_log_probs is not None}
        step.on_policy_keys = [k for k, s in zip(keys, specs) if s.stored_log_probs is None]
        return KVBatchMeta(
            partition_id=pid, keys=list(batch.keys) + keys + pad_keys, tags=list(batch.tags) + tags + pad_tags,
            fields=batch.fields, extra_info=dict(batch.extra_info or {}),
        )

    def _score_with_reward_workers(self, rows: list[dict]) -> Optional[list[tuple[float, dict]]]:
        """Score rows exactly like rollouts: verl's reward-loop workers (same reward manager,
        reward function and kwargs). None when rewards come from a colocated reward model."""
        handles = getattr(self.reward_loop_manager, "reward_loop_worker_handles", None)
        if not handles:
            return None
        refs = [handles[i % len(handles)].compute_score.remote(reward_input(row)) for i, row in enumerate(rows)]
        return [(float(r["reward_score"]), dict(r.get("reward_extra_info") or {})) for r in ray.get(refs)]

    def _after_old_log_prob(self, batch: KVBatchMeta, step: GroupStep, metrics: dict) -> None:
        """On-policy replay rows get rollout_log_probs := old_log_probs (no correction, and verl's
        rollout-correction code sees ratio 1); verl's entropy and rollout-vs-actor metrics are
        recomputed over fresh rows only, so they keep describing the policy's own rollouts."""
        pid = batch.partition_id
        calc = bool(self.config.actor_rollout_ref.rollout.calculate_log_probs)
        if step.on_policy_keys and calc:
            old = self.tq.kv_batch_get(keys=step.on_policy_keys, partition_id=pid, select_fields=["old_log_probs"])
            rlp = nested([r.float() for r in old["old_log_probs"].unbind(0)])
            self.tq.kv_batch_put(keys=step.on_policy_keys, partition_id=pid, fields=TensorDict({"rollout_log_probs": rlp}, batch_size=[len(step.on_policy_keys)]))
        replay = set(step.replay_keys)
        fresh = [k for k in batch.keys if k not in replay]
        fields = ["entropy", "old_log_probs", "response_mask", "responses"] + (["rollout_log_probs"] if calc else [])
        data = DataProto(batch=self.tq.kv_batch_get(keys=fresh, partition_id=pid, select_fields=fields).to_padded_tensor())
        actor = self.config.actor_rollout_ref.actor
        metrics["actor/entropy"] = agg_loss(
            loss_mat=data.batch["entropy"], loss_mask=data.batch["response_mask"],
            loss_agg_mode=actor.loss_agg_mode, loss_scale_factor=actor.get("loss_scale_factor", None),
        ).detach().item()
        if calc:
            metrics.update(calculate_debug_metrics(data))

    def _write_loss_fields(self, batch: KVBatchMeta, step: Optional[GroupStep]) -> KVBatchMeta:
        """The replay-aware loss's fields on every row (:func:`dyjr_verl.replay.rows.loss_fields`)."""
        pid = batch.partition_id
        data = step.data if step is not None and step.data is not None else self.tq.kv_batch_get(
            keys=batch.keys, partition_id=pid, select_fields=["response_mask", "loss_mask", "old_log_probs"])
        stored = step.stored if step is not None else {}
        masks = data["response_mask"].unbind(0)
        logprobs = [stored.get(key, old.float()) for key, old in zip(batch.keys, data["old_log_probs"].unbind(0), strict=True)]
        for key, lp, mask in zip(batch.keys, logprobs, masks, strict=True):
            if lp.numel() != mask.numel():
                raise ValueError(f"stored log-probs of {key} have {lp.numel()} entries for {mask.numel()} response tokens")
        n = int(self.config.actor_rollout_ref.rollout.n)
        mini = step.mini_rows if step is not None and step.replay_keys else int(self.config.actor_rollout_ref.actor.ppo_mini_batch_size) * n
        fields = loss_fields(
            [key in stored for key in batch.keys], [int(m.sum()) for m in masks], logprobs,
            mini_batch_size=mini, dp_size=self._actor_dp_size(), shuffle=bool(self.config.actor_rollout_ref.actor.shuffle),
            loss_tokens=[int(m.sum()) for m in data["loss_mask"].unbind(0)],  # verl's token-mean count
        )
        meta = self.tq.kv_batch_put(keys=batch.keys, partition_id=pid, fields=TensorDict(fields, batch_size=[len(batch)]))
        return KVBatchMeta(
            partition_id=pid, keys=list(batch.keys), tags=list(batch.tags),
            fields=list(meta.fields) if meta.fields else None, extra_info=dict(batch.extra_info or {}),
        )


plugin.register_pending(__name__)  # last: see dyjr_verl/plugin.py
