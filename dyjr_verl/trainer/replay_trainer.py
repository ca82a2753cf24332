"""Replay on verl 0.9.1's v1 (TransferQueue) trainer, without forking verl.

:class:`ReplayTrainer` subclasses verl's ``PPOTrainerSync`` and overrides one stage,
``_update_actor``; everything else (rollout, reward, balancing, old log-probs, advantages,
validation, checkpoint cadence) is verl's own. Per training step ``t``:

1. read this step's trajectories back from TransferQueue (verl clears them after the step);
2. write the fields the replay-aware loss needs on every fresh row (``replay_mask=0``,
   ``stored_log_probs``, the per-mini-batch normalisers);
3. sample rows from the method's store (ages >= 1: this step's rollouts are not in it yet) and
   put them into TransferQueue under fresh keys, **interleaved** into the fresh mini-batches so
   every optimizer step sees fresh and replay rows together and the number of optimizer steps is
   unchanged (the mini-batch grows by the replay share instead);
4. call verl's ``_update_actor`` on the enlarged batch; the loss installed with ``set_loss_fn``
   gives fresh rows verl's ``ppo_loss`` and replay rows only the method's replay term;
5. drop the replay keys, feed the loss's drift metric back to the store, push this step's rows.

The original batch is returned, so verl's metrics, sample counts and end-of-step clearing never
see the replay rows. Subclasses choose what is stored and how rows are drawn
(:meth:`store_rows`, :meth:`draw_rows`, :meth:`replay_overrides`); DyJR is :class:`DyJRTrainer`.

Rows can join a step at two places, one framework for both:

* **at the actor update** (:class:`ReplayTrainer`, DyJR): the rows above, outside every advantage,
  trained only through the replay term of the loss;
* **inside their prompt's group** (:class:`GroupReplayTrainer`, RLEP and Ex-GRPO): replayed
  trajectories are appended to a GRPO group *before* verl's ``_balance_batch`` (so verl balances,
  pads, recomputes old log-probs and computes the group advantage over fresh + replayed rows).
  They share the group's ``uid`` (GRPO groups by it) under TransferQueue keys with a fresh prefix
  (verl's replay buffer groups keys by the prefix before the first ``_``), are scored with verl's
  reward workers (or carry a stored score), and leave TransferQueue when the step ends, so
  ``_compute_metrics`` and the end-of-step clear see fresh rows only. The optimizer still takes
  as many steps as GRPO would: the mini-batch grows to hold the replayed rows.

:class:`ReplayTrainerBase` holds what both share: the ``"sync"`` masquerade, the method's typed
config node, its store and RNG (checkpointed beside verl's checkpoint), the loss installation, the
mini-batch growth and the TransferQueue row helpers.

Trainer-mode caveat: verl compares ``self.trainer_mode`` with the literal ``"sync"`` in several
places (replay-buffer class, checkpoint TQ state, refill, ...), so ``trainer_mode`` is a property
that reads ``"sync"`` while the registered name stays selectable.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import os
import pickle
import uuid
from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np
import ray
import torch
import transfer_queue as tq
from omegaconf import DictConfig
from tensordict import NonTensorStack, TensorDict
from transfer_queue import KVBatchMeta
from verl.protocol import DataProto
from verl.trainer.ppo.core_algos import agg_loss
from verl.trainer.ppo.v1.trainer_base import register_trainer
from verl.utils.debug import marked_timer
from verl.utils.debug.metrics import calculate_debug_metrics
from verl.workers.utils.padding import response_from_nested

from dyjr_verl.config import DyJRConfig
from dyjr_verl.losses.replay_loss import (
    REPLAY_MASK_KEY,
    STORED_LOG_PROBS_KEY,
    ReplayLossSpec,
    make_replay_loss_fn,
    minibatch_normalizer_fields,
)
from dyjr_verl.losses.topk_js import (
    TOPK_IDS_KEY,
    TOPK_JS_TERM,
    TOPK_LOG_REST_KEY,
    TOPK_LOGP_KEY,
    TOPK_RECORD_PREFIX,
    make_topk_js_replay_loss_fn,
    record_from_model_output,
)
from dyjr_verl.replay.buffer import TimeSensitiveBuffer, Trajectory
from dyjr_verl.replay.placement import (  # noqa: F401  (plan_minibatches: re-export)
    UpdateShape, forward_row_multiple, place_replay_rows, plan_minibatches, training_micro_batch,
)
from dyjr_verl.replay.pools import question_key
from dyjr_verl.trainer.probe import ProbedSyncTrainer
from dyjr_verl.trainer.state import buffer_digest

logger = logging.getLogger(__name__)
logger.setLevel(os.getenv("VERL_LOGGING_LEVEL", "INFO"))

BUFFER_CKPT_NAME = "dyjr_replay_state.pkl"


# ------------------------------------------------------------------------------------------------
# TensorDict <-> rows
# ------------------------------------------------------------------------------------------------


def td_to_rows(td: TensorDict) -> list[dict[str, Any]]:
    """Split a TransferQueue batch into per-row dicts (tensors unbound, non-tensors as objects)."""
    n = td.batch_size[0]
    columns: dict[str, list] = {}
    for key in td.keys():
        value = td.get(key)
        if isinstance(value, torch.Tensor):
            columns[key] = list(value.unbind(0))
        elif hasattr(value, "tolist"):
            columns[key] = list(value.tolist())
        else:
            columns[key] = [value] * n
    return [{k: v[i] for k, v in columns.items()} for i in range(n)]


def rows_to_td(rows: list[dict[str, Any]], like: TensorDict) -> TensorDict:
    """Rows -> TensorDict with exactly ``like``'s fields and layouts (jagged stays jagged even when
    every row happens to have the same length, which ``list_of_dict_to_tensordict`` would stack)."""
    out: dict[str, Any] = {}
    for key in like.keys():
        ref = like.get(key)
        values = [row[key] for row in rows]
        if isinstance(ref, torch.Tensor) and ref.is_nested:
            out[key] = torch.nested.as_nested_tensor(
                [torch.as_tensor(v).to(ref.dtype).contiguous() for v in values], layout=torch.jagged
            )
        elif isinstance(ref, torch.Tensor):
            out[key] = torch.stack([torch.as_tensor(v).to(ref.dtype) for v in values])
        else:
            out[key] = NonTensorStack(*values)
    return TensorDict(out, batch_size=[len(rows)])


def _nested(rows: list[torch.Tensor]) -> torch.Tensor:
    return torch.nested.as_nested_tensor([r.contiguous() for r in rows], layout=torch.jagged)


# ------------------------------------------------------------------------------------------------
# What every replay trainer shares
# ------------------------------------------------------------------------------------------------


class ReplayTrainerBase(ProbedSyncTrainer):
    """Sync PPO trainer with a method config node, a replay store and the replay-aware loss.

    Subclasses pick where replayed rows enter the step (:class:`ReplayTrainer`: at the actor
    update; :class:`GroupReplayTrainer`: inside their group, before advantages).
    """

    #: hydra node holding the method's settings, e.g. ``dyjr``
    config_node: str = "dyjr"
    #: metric prefix for the method's trainer-side metrics
    metric_prefix: str = "dyjr/"

    def __init__(self, config: DictConfig):
        self.method_config = self.parse_method_config(config)
        self._replay_rng = np.random.default_rng(self.replay_seed())
        self.store = self.build_store()
        super().__init__(config)

    # -- hooks for subclasses ----------------------------------------------------------------------
    def parse_method_config(self, config: DictConfig) -> Any:
        return DyJRConfig.from_omegaconf(config.get(self.config_node), path=self.config_node)

    def replay_seed(self) -> int:
        return int(self.method_config.replay.seed)

    def build_store(self) -> Any:
        return TimeSensitiveBuffer(self.method_config.buffer)

    def loss_spec(self) -> Optional[ReplayLossSpec]:
        """The replay term of the loss installed with ``set_loss_fn``; None keeps verl's loss
        (replayed rows are then ordinary rows, as in RLEP)."""
        return ReplayLossSpec.from_dyjr_config(self.method_config)

    def replay_enabled(self) -> bool:
        return bool(self.method_config.enable)

    def store_metrics(self) -> dict[str, float]:
        return self.store.metrics(prefix=f"{self.metric_prefix}buffer/")

    def store_digest(self, state: dict) -> str:
        """Content digest of a saved store state (printed on resume; tests compare it)."""
        return buffer_digest(state)

    def extra_state(self) -> dict[str, Any]:
        """Method state saved beside the store (e.g. Ex-GRPO's activation flag)."""
        return {}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        return None

    @property
    def replay_loss_installed(self) -> bool:
        return self.replay_enabled() and self.loss_spec() is not None

    def method_loss_fn(self, actor_cfg: Any):
        if not self.replay_loss_installed:
            return None
        spec = self.loss_spec()
        logger.info(f"{self.registered_mode}: replay-aware loss ({spec})")
        if spec.kind == TOPK_JS_TERM:
            return make_topk_js_replay_loss_fn(actor_cfg, spec)
        return make_replay_loss_fn(actor_cfg, spec)

    def uses_topk_record(self) -> bool:
        return self.topk_record_k() > 0

    # -- helpers -------------------------------------------------------------------------------------
    def _update_shape(self, fresh_rows: int) -> UpdateShape:
        """How verl will split this step's actor update (the replay placement depends on it)."""
        actor = self.config.actor_rollout_ref.actor
        dp = self._actor_dp_size()
        mini = int(actor.ppo_mini_batch_size) * int(self.config.actor_rollout_ref.rollout.n)
        return UpdateShape(fresh_rows=fresh_rows, minibatch_rows=mini, dp=dp, micro=training_micro_batch(actor, dp))

    def _forward_row_multiple(self, dp: int) -> int:
        return forward_row_multiple(self.config, dp, use_reference=self.use_reference_policy)

    def _actor_dp_size(self) -> int:
        wg = self.actor_rollout_wg
        if "actor" not in wg._dispatch_info:
            wg._dispatch_info["actor"] = wg._query_dispatch_info("actor")
        return max(wg._dispatch_info["actor"]) + 1

    @contextlib.contextmanager
    def _mini_batch_rows(self, rows: int):
        """verl's _update_actor sends ppo_mini_batch_size x n as the mini-batch row count; for this
        one call it becomes fresh + replay rows, so the number of optimizer steps stays the same."""
        wg = self.actor_rollout_wg
        original = wg.update_actor

        def update_actor(batch: KVBatchMeta, *args, **kwargs):
            batch.extra_info["mini_batch_size"] = rows
            batch.extra_info["global_batch_size"] = rows
            if self.uses_topk_record():  # the engine calls the loss as logits processor (exact top-k JS)
                batch.extra_info["distillation_use_topk"] = True
            return original(batch, *args, **kwargs)

        wg.update_actor = update_actor
        try:
            yield
        finally:
            wg.update_actor = original

    @staticmethod
    def _recorded_log_probs(data: TensorDict) -> torch.Tensor:
        """Log-probs of the sampling policy: vLLM's rollout log-probs, else verl's old log-probs."""
        key = "rollout_log_probs" if "rollout_log_probs" in data.keys() else "old_log_probs"
        return _nested([r.float() for r in data.get(key).unbind(0)])

    # -- checkpointing -------------------------------------------------------------------------------
    def _save_checkpoint(self):
        super()._save_checkpoint()
        folder = os.path.join(self.config.trainer.default_local_dir, f"global_step_{self.global_steps}")
        os.makedirs(folder, exist_ok=True)
        state = {"store": self.store.state_dict(), "rng": self._replay_rng.bit_generator.state}
        extra = self.extra_state()
        if extra:
            state["extra"] = extra
        tmp = os.path.join(folder, BUFFER_CKPT_NAME + ".tmp")
        with open(tmp, "wb") as f:
            pickle.dump(state, f)
        os.replace(tmp, os.path.join(folder, BUFFER_CKPT_NAME))

    def _load_checkpoint(self):
        super()._load_checkpoint()
        if self.global_steps <= 0:
            return
        folder = self._resumed_folder()
        path = os.path.join(folder, BUFFER_CKPT_NAME) if folder else None
        if path and os.path.exists(path):
            with open(path, "rb") as f:
                state = pickle.load(f)
            self.store.load_state_dict(state["store"])
            self._replay_rng.bit_generator.state = state["rng"]
            self.load_extra_state(state.get("extra", {}))
            # printed (not logged) so that the driver's log always shows it; tests compare it
            print(f"{self.config_node}: replay store restored from {path}: {len(self.store)} rows, "
                  f"restored_digest={self.store_digest(self.store.state_dict())}", flush=True)
        else:
            logger.warning(f"resumed at step {self.global_steps} without a replay store checkpoint: starting empty")

    def _resumed_folder(self) -> str | None:
        trainer = self.config.trainer
        if trainer.resume_mode == "resume_path":
            folder = trainer.resume_from_path
        else:
            folder = os.path.join(trainer.default_local_dir, f"global_step_{self.global_steps}")
        if not os.path.isabs(folder):
            folder = os.path.join(os.getcwd(), folder)
        return folder


# ------------------------------------------------------------------------------------------------
# Replayed rows at the actor update (DyJR)
# ------------------------------------------------------------------------------------------------


class ReplayTrainer(ReplayTrainerBase):
    """Replay rows join at ``_update_actor``, outside every advantage (see the module docstring)."""

    # -- hooks for subclasses ----------------------------------------------------------------------
    def target_replay_rows(self, fresh_rows: int) -> int:
        if len(self.store) < self.method_config.replay.min_buffer:
            return 0
        return self.method_config.replay.num_rows(fresh_rows)

    def draw_rows(self, n: int) -> list[Trajectory]:
        return self.store.sample(n, self._replay_rng)

    def store_rows(self, step: int, trajectories: list[Trajectory]) -> dict[str, float]:
        self.store.push(step, trajectories)
        return {}

    def replay_overrides(self, traj: Trajectory, like: TensorDict) -> dict[str, Any]:
        """Field values of a replayed row that differ from the stored row (DyJR: no advantage)."""
        stored = torch.as_tensor(traj.logprobs)
        out = {STORED_LOG_PROBS_KEY: stored, "old_log_probs": stored}
        for key in ("advantages", "returns"):
            if key in like.keys():
                out[key] = torch.zeros_like(stored)
        return out

    # -- verl hooks ----------------------------------------------------------------------------------
    def _update_actor(self, batch: KVBatchMeta, metrics: dict) -> KVBatchMeta:
        if not self.replay_enabled():
            return super()._update_actor(batch, metrics)
        step = int(self.global_steps)
        if hasattr(self.store, "advance"):
            self.store.advance(step)

        data = tq.kv_batch_get(keys=batch.keys, partition_id=batch.partition_id)
        topk_fields = self._take_topk_record(data) if self.uses_topk_record() else {}
        data = data.exclude(*[k for k in data.keys() if k.startswith(TOPK_RECORD_PREFIX)])
        fresh_rows = td_to_rows(data)
        for i, row in enumerate(fresh_rows):  # the record travels with the trajectory into the buffer
            row.update({key: value[i] for key, value in topk_fields.items()})
        real = [not tag.get("is_padding", False) for tag in batch.tags]

        fresh_total = len(batch)
        shape = self._update_shape(fresh_total)
        mini, dp, num_mb = shape.minibatch_rows, shape.dp, shape.num_minibatches
        # the same placement `python -m dyjr_verl plan` reports (dyjr_verl/replay/placement.py)
        placement = place_replay_rows(self.target_replay_rows(sum(real)), shape)
        drawn = self.draw_rows(placement.rows) if placement.rows else []
        if len(drawn) < placement.rows:  # the store holds fewer rows than planned (early steps)
            placement = place_replay_rows(placement.target_rows, shape, available=len(drawn))
            drawn = drawn[: placement.rows]
        per_mb = placement.per_minibatch

        # Row order handed to update_actor: per dp rank, per mini-batch, fresh rows then replay rows.
        order: list[tuple[str, int]] = []  # ("f", fresh index) | ("r", drawn index)
        fresh_chunk, fresh_per = fresh_total // dp, mini // dp
        rep_chunk, rep_per = per_mb * num_mb // dp, per_mb // dp
        for d in range(dp):
            for j in range(num_mb):
                order += [("f", d * fresh_chunk + j * fresh_per + i) for i in range(fresh_per)]
                order += [("r", d * rep_chunk + j * rep_per + i) for i in range(rep_per)]

        stored_fresh = self._recorded_log_probs(data)
        resp_mask = data.get("response_mask")
        fresh_tokens = [int(m.sum()) for m in resp_mask.unbind(0)]
        is_replay = [kind == "r" for kind, _ in order]
        tokens = [fresh_tokens[i] if kind == "f" else drawn[i].num_tokens for kind, i in order]
        norm = minibatch_normalizer_fields(
            is_replay, tokens, mini_batch_size=mini + per_mb, dp_size=dp,
            shuffle=bool(self.config.actor_rollout_ref.actor.shuffle),
        )
        position = {(kind, i): p for p, (kind, i) in enumerate(order)}

        fresh_fields = {
            REPLAY_MASK_KEY: torch.zeros(fresh_total, dtype=torch.float32),
            STORED_LOG_PROBS_KEY: stored_fresh,
            **topk_fields,
        }
        for key, values in norm.items():
            fresh_fields[key] = torch.stack([values[position[("f", i)]] for i in range(fresh_total)])
        meta = tq.kv_batch_put(
            keys=batch.keys, partition_id=batch.partition_id,
            fields=TensorDict(fresh_fields, batch_size=[fresh_total]),
        )

        replay_keys: list[str] = []
        replay_tags: list[dict] = []
        if drawn:
            like_full = TensorDict({**{k: data.get(k) for k in data.keys()}, **fresh_fields}, batch_size=[fresh_total])
            rows = []
            for i, traj in enumerate(drawn):
                row = {**traj.payload, **self.replay_overrides(traj, like_full)}
                row[REPLAY_MASK_KEY] = torch.tensor(1.0)
                for key, values in norm.items():
                    row[key] = values[position[("r", i)]]
                rows.append(row)
            replay_td = rows_to_td(rows, like_full)
            prefix = f"replay{uuid.uuid4().hex[:12]}"
            replay_keys = [f"{prefix}_{i}_0" for i in range(len(drawn))]
            replay_tags = [{**traj.payload.get("_tags", {}), "is_replay": True, "is_padding": False} for traj in drawn]
            meta = tq.kv_batch_put(keys=replay_keys, partition_id=batch.partition_id, fields=replay_td, tags=replay_tags)

        all_keys = [batch.keys[i] if kind == "f" else replay_keys[i] for kind, i in order]
        all_tags = [batch.tags[i] if kind == "f" else replay_tags[i] for kind, i in order]
        fields = [f for f in meta.fields if not f.startswith(TOPK_RECORD_PREFIX)] if meta.fields else None
        enlarged = KVBatchMeta(
            partition_id=batch.partition_id, keys=all_keys, tags=all_tags,
            fields=fields, extra_info=dict(batch.extra_info or {}),
        )
        try:
            with self._mini_batch_rows(mini + per_mb):
                super()._update_actor(enlarged, metrics)
        finally:
            if replay_keys:
                tq.kv_clear(keys=replay_keys, partition_id=batch.partition_id)

        drift = metrics.get("actor/replay/drift")
        if drawn and drift is not None and hasattr(self.store, "report_drift"):
            self.store.report_drift(drift)
        trajectories = [
            self._to_trajectory(row, batch.tags[i], stored_fresh[i], step)
            for i, row in enumerate(fresh_rows) if real[i]
        ]
        metrics.update(self.store_rows(step, trajectories))
        ages = [step - t.step for t in drawn]
        metrics.update(self.store_metrics())
        metrics.update({
            f"{self.metric_prefix}replay/rows": float(len(drawn)),
            f"{self.metric_prefix}replay/target_rows": float(placement.target_rows),
            f"{self.metric_prefix}replay/tokens": float(sum(t.num_tokens for t in drawn)),
            f"{self.metric_prefix}replay/mean_age": float(np.mean(ages)) if ages else 0.0,
            f"{self.metric_prefix}replay/share": len(drawn) / float(len(drawn) + fresh_total),
        })
        return batch

    # -- helpers -------------------------------------------------------------------------------------
    def topk_record_k(self) -> int:
        js = self.method_config.js
        return int(js.topk_k) if self.replay_enabled() and js.estimator == "topk" else 0

    def _take_topk_record(self, data: TensorDict) -> dict[str, torch.Tensor]:
        """The step's top-k record (written by the old-log-prob probe) as the response-aligned
        fields the top-k loss reads, padded to ``data.max_response_length`` so that rows of any
        step stack: ids int32 (B, L, k), log-probs and rest mass bf16 (``6k + 2`` bytes/token)."""
        k = self.topk_record_k()
        rec = record_from_model_output(data, data, k, dtype=torch.bfloat16)
        width = max(int(self.config.data.max_response_length), rec.ids.shape[1])

        def pad(t: torch.Tensor) -> torch.Tensor:
            out = t.new_zeros((t.shape[0], width, *t.shape[2:]))
            out[:, : t.shape[1]] = t
            return out

        return {TOPK_IDS_KEY: pad(rec.ids), TOPK_LOGP_KEY: pad(rec.logp), TOPK_LOG_REST_KEY: pad(rec.log_rest)}

    @staticmethod
    def _to_trajectory(row: dict, tags: dict, logprobs: torch.Tensor, step: int) -> Trajectory:
        rm = row.get("rm_scores")
        reward = float(rm.float().sum()) if isinstance(rm, torch.Tensor) else float("nan")
        payload = {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in row.items()}
        payload["_tags"] = dict(tags)
        return Trajectory(
            prompt_ids=row["prompts"], response_ids=row["responses"], response_mask=row["response_mask"],
            logprobs=logprobs.float(), reward=reward, uid=str(row.get("uid", "")), step=step, payload=payload,
        )


# ------------------------------------------------------------------------------------------------
# Replayed rows inside their prompt's group (RLEP, Ex-GRPO)
# ------------------------------------------------------------------------------------------------

#: tensor fields :func:`make_replay_row` rebuilds for a new response; every other tensor field is
#: copied from the template row, except that one shaped like the response or the sequence is an
#: error (its meaning for the new response is unknown: e.g. MoE routing replay, teacher top-k)
REBUILT_FIELDS = (
    "prompts", "responses", "response_mask", "loss_mask", "input_ids", "position_ids",
    "attention_mask", "rm_scores", "rollout_log_probs",
)
_COPIED_TENSOR_FIELDS = ("dummy_tensor",)


def make_replay_row(
    template: dict[str, Any],
    tag: dict[str, Any],
    response_ids: Any,
    *,
    score: float,
    session_id: int,
    rollout_log_probs: Optional[torch.Tensor] = None,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """A trajectory row of the template's prompt with another response, in verl's v1 row layout.

    ``template``/``tag``: a fresh row of the group (as read back from TransferQueue before
    ``_compute_old_log_prob``) and its tag. The new row keeps every prompt-side field (``uid``
    included, so GRPO puts it in the same group), gets ``response_ids`` with a full response mask,
    the score on its last token in ``rm_scores`` (as verl's agent loop writes it) and
    ``rollout_log_probs`` (zeros when not given; they are replaced later for on-policy rows).
    The tag gets the new lengths and ``is_replay=True``.
    """
    response = torch.as_tensor(response_ids, dtype=torch.int64).reshape(-1).clone()
    length = int(response.numel())
    if length < 1:
        raise ValueError("a replayed response needs at least one token")
    prompts = torch.as_tensor(template["prompts"])
    p_len = int(prompts.numel())
    t_resp = int(torch.as_tensor(template["responses"]).numel())
    t_seq = p_len + t_resp
    for key, value in template.items():
        if key in REBUILT_FIELDS or key in _COPIED_TENSOR_FIELDS or not isinstance(value, torch.Tensor):
            continue
        if value.dim() >= 1 and value.shape[0] in (t_resp, t_seq):
            raise NotImplementedError(
                f"cannot replay a row with the per-token field {key!r} (shape {tuple(value.shape)}): "
                "group replay rebuilds only " + ", ".join(REBUILT_FIELDS)
            )
    row = dict(template)
    mask_dtype = torch.as_tensor(template["response_mask"]).dtype
    row["responses"] = response
    row["response_mask"] = torch.ones(length, dtype=mask_dtype)
    row["input_ids"] = torch.cat([prompts.to(torch.int64), response]).to(torch.as_tensor(template["input_ids"]).dtype)
    if "loss_mask" in template:
        lm = torch.as_tensor(template["loss_mask"])
        if lm.numel() == t_seq and t_seq != t_resp:
            row["loss_mask"] = torch.cat([torch.zeros(p_len, dtype=lm.dtype), torch.ones(length, dtype=lm.dtype)])
        else:
            row["loss_mask"] = torch.ones(length, dtype=lm.dtype)
    if "attention_mask" in template:
        am = torch.as_tensor(template["attention_mask"])
        row["attention_mask"] = torch.ones(p_len + length, dtype=am.dtype)
    if "position_ids" in template:
        pos = torch.as_tensor(template["position_ids"])
        if pos.dim() != 1 or not torch.equal(pos, torch.arange(t_seq, dtype=pos.dtype)):
            raise NotImplementedError("group replay supports text rows with position_ids = arange(seq_len) only")
        row["position_ids"] = torch.arange(p_len + length, dtype=pos.dtype)
    rm = torch.zeros(length, dtype=torch.float32)
    rm[-1] = float(score)
    row["rm_scores"] = rm
    if "rollout_log_probs" in template:
        ref = torch.as_tensor(template["rollout_log_probs"])
        lp = torch.zeros(length) if rollout_log_probs is None else torch.as_tensor(rollout_log_probs).reshape(-1)
        if lp.numel() != length:
            raise ValueError(f"rollout_log_probs has {lp.numel()} entries for a {length}-token response")
        row["rollout_log_probs"] = lp.to(ref.dtype)
    if "session_id" in template:
        row["session_id"] = session_id
    if isinstance(template.get("extra_fields"), dict):
        extra = copy.deepcopy(template["extra_fields"])
        extra["reward_extra_info"] = {}
        row["extra_fields"] = extra
    new_tag = {
        **copy.deepcopy(tag), "status": "success", "prompt_len": p_len, "response_len": length,
        "seq_len": p_len + length, "is_replay": True, "is_padding": False,
    }
    return row, new_tag


def spread_rows(kinds: list[int], dp: int, num_minibatches: int) -> list[int]:
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


def padding_rows(template: dict[str, Any], tag: dict[str, Any], n: int, *, eos_token_id: Optional[int]) -> tuple[list[dict], list[dict]]:
    """``n`` no-op rows on the template's prompt: one EOS response token with a zero response
    mask and reward, in their own group (a fresh ``uid``), tagged ``is_padding`` like verl's own
    padding rows, so losses, advantages and metrics ignore them."""
    if n <= 0:
        return [], []
    uid = f"pad{uuid.uuid4().hex}"
    eos = 0 if eos_token_id is None else int(eos_token_id)
    rows, tags = [], []
    for i in range(n):
        row, pad_tag = make_replay_row(template, tag, [eos], score=0.0, session_id=i)
        row["uid"] = uid
        row["response_mask"] = torch.zeros_like(row["response_mask"])
        if "loss_mask" in row:
            row["loss_mask"] = torch.zeros_like(row["loss_mask"])
        pad_tag["is_padding"], pad_tag["is_replay"] = True, False
        rows.append(row)
        tags.append(pad_tag)
    return rows, tags


def td_column(td: TensorDict, key: str) -> list:
    """A non-tensor column of a TransferQueue read as a python list (NonTensorStack, LinkedList, ...)."""
    value = td.get(key)
    if hasattr(value, "tolist"):
        value = value.tolist()
    return list(value)


@dataclass
class PromptGroup:
    """One prompt's fresh rollouts in this step's batch."""

    uid: str
    keys: list[str]
    question: str  # dyjr_verl.replay.pools.question_key of the prompt
    raw_prompt: Any
    data_source: Any


@dataclass
class ReplayRowSpec:
    """A row a method wants appended to group ``uid``.

    score: the row's reward; None = score it with verl's reward workers (like a rollout).
    stored_log_probs: recorded per-token log-probs the replay loss compares with (Ex-GRPO);
        None = an on-policy row (RLEP): an ordinary row for verl's loss, whose
        ``rollout_log_probs`` become the recomputed old log-probs (no importance correction).
    """

    uid: str
    response_ids: torch.Tensor
    score: Optional[float] = None
    stored_log_probs: Optional[torch.Tensor] = None


@dataclass
class GroupStep:
    """Per-step state of group replay (built in ``_balance_batch``, consumed after the step)."""

    partition_id: str
    groups: dict[str, PromptGroup]
    tags: dict[str, dict]
    fresh_rows: int
    replay_keys: list[str] = field(default_factory=list)
    padding_keys: list[str] = field(default_factory=list)  # our no-op rows completing the mini-batches
    replay_uids: list[str] = field(default_factory=list)
    replay_scores: list[float] = field(default_factory=list)
    replay_tokens: int = 0
    stored: dict[str, torch.Tensor] = field(default_factory=dict)
    on_policy_keys: list[str] = field(default_factory=list)
    mini_rows: int = 0
    num_minibatches: int = 0
    scratch: dict[str, Any] = field(default_factory=dict)


class GroupReplayTrainer(ReplayTrainerBase):
    """Replayed trajectories join their prompt's GRPO group before advantages (module docstring).

    Subclasses implement :meth:`plan_group_replay` (which rows join which group this step) and
    :meth:`after_group_step` (update the store from the finished step); everything else —
    TransferQueue keys and tags, reward scoring, mini-batch sizing and padding, fresh-only verl
    metrics, the replay-aware loss fields, cleanup — is here.
    """

    metric_prefix: str = "replay/"
    #: True: replayed rows add optimizer steps of ppo_mini_batch_size x n rows (official RLEP);
    #: False: verl's step count on the fresh rows, mini-batches grow (dyjr_verl.replay.placement.plan_minibatches)
    keeps_minibatch_rows: bool = False

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

    def on_policy_replay(self) -> bool:
        return False

    # -- services for subclasses -------------------------------------------------------------------
    def group_templates(self, uids: Any) -> dict[str, tuple[dict, dict]]:
        """uid -> (row, tag) of one fresh row of the group (all fields), fetched once per step."""
        step = self._group_step
        need = [u for u in dict.fromkeys(uids) if u not in self._template_cache]
        if need:
            keys = [step.groups[u].keys[0] for u in need]
            td = tq.kv_batch_get(keys=keys, partition_id=step.partition_id)
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
        prefix = f"{self.config_node}cand{uuid.uuid4().hex[:12]}"
        keys = [f"{prefix}_{j}_0" for j in range(len(rows))]
        tq.kv_batch_put(keys=keys, partition_id=step.partition_id, fields=rows_to_td(rows, self._template_like), tags=tags)
        try:
            meta = KVBatchMeta(
                partition_id=step.partition_id, keys=keys, tags=tags,
                extra_info={"calculate_entropy": True, "compute_loss": False,
                            "temperature": self.config.actor_rollout_ref.rollout.temperature},
            )
            self.actor_rollout_wg.compute_log_prob(meta)
            data = tq.kv_batch_get(keys=keys, partition_id=step.partition_id, select_fields=["entropy", "response_mask"])
            entropy = response_from_nested(data["entropy"], data["response_mask"])
            means = []
            for ent, mask in zip(entropy.unbind(0), data["response_mask"].unbind(0), strict=True):
                m = mask.float()
                means.append(float((ent.float() * m).sum() / m.sum().clamp(min=1.0)))
        finally:
            tq.kv_clear(keys=keys, partition_id=step.partition_id)
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
        if not step.replay_keys:
            return batch
        # replayed rows leave now: verl's metrics, sample counts and end-of-step clear see fresh rows
        ours = step.replay_keys + step.padding_keys
        tq.kv_clear(keys=ours, partition_id=batch.partition_id)
        ours = set(ours)
        return batch.select_keys([k for k in batch.keys if k not in ours])

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
        if self.replay_loss_installed:
            batch = self._write_replay_fields(batch, step)
        if step is not None and step.replay_keys:
            with self._mini_batch_rows(step.mini_rows):
                return super()._update_actor(batch, metrics)
        return super()._update_actor(batch, metrics)

    # -- internals -----------------------------------------------------------------------------------
    def _inject_group_rows(self, batch: KVBatchMeta, metrics: dict) -> KVBatchMeta:
        pid = batch.partition_id
        info = tq.kv_batch_get(keys=batch.keys, partition_id=pid, select_fields=["uid", "raw_prompt", "data_source"])
        groups: dict[str, PromptGroup] = {}
        for key, uid, raw_prompt, source in zip(
            batch.keys, td_column(info, "uid"), td_column(info, "raw_prompt"), td_column(info, "data_source"), strict=True
        ):
            uid = str(uid)
            if uid not in groups:
                groups[uid] = PromptGroup(uid, [], question_key(raw_prompt, source), raw_prompt, source)
            groups[uid].keys.append(key)
        step = GroupStep(partition_id=pid, groups=groups, tags=dict(zip(batch.keys, batch.tags)), fresh_rows=len(batch))
        self._group_step = step
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

        prefix = f"{self.config_node}{uuid.uuid4().hex[:12]}"  # never a prompt uid of verl's buffer
        keys = [f"{prefix}_{j}_0" for j in range(len(rows))]
        pad_keys = [f"{prefix}pad_{j}_0" for j in range(n_pad)]
        tq.kv_batch_put(
            keys=keys + pad_keys, partition_id=pid, fields=rows_to_td(rows + pad_rows, self._template_like),
            tags=tags + pad_tags,
        )
        if scored is None:  # a colocated reward model scores batches, not single rows
            need = [keys[i] for i in to_score]
            self._compute_reward_colocate(KVBatchMeta(partition_id=pid, keys=need, tags=[tags[i] for i in to_score]))
            scores = tq.kv_batch_get(keys=keys, partition_id=pid, select_fields=["rm_scores"])["rm_scores"].unbind(0)
        else:
            scores = [r["rm_scores"] for r in rows]

        step.replay_keys = keys
        step.padding_keys = pad_keys
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
        refs = [handles[i % len(handles)].compute_score.remote(_reward_input(row)) for i, row in enumerate(rows)]
        return [(float(r["reward_score"]), dict(r.get("reward_extra_info") or {})) for r in ray.get(refs)]

    def _after_old_log_prob(self, batch: KVBatchMeta, step: GroupStep, metrics: dict) -> None:
        """On-policy replay rows get rollout_log_probs := old_log_probs (no correction, and verl's
        rollout-correction code sees ratio 1); verl's entropy and rollout-vs-actor metrics are
        recomputed over fresh rows only, so they keep describing the policy's own rollouts."""
        pid = batch.partition_id
        calc = bool(self.config.actor_rollout_ref.rollout.calculate_log_probs)
        if step.on_policy_keys and calc:
            old = tq.kv_batch_get(keys=step.on_policy_keys, partition_id=pid, select_fields=["old_log_probs"])
            rlp = _nested([r.float() for r in old["old_log_probs"].unbind(0)])
            tq.kv_batch_put(keys=step.on_policy_keys, partition_id=pid, fields=TensorDict({"rollout_log_probs": rlp}, batch_size=[len(step.on_policy_keys)]))
        replay = set(step.replay_keys)
        fresh = [k for k in batch.keys if k not in replay]
        fields = ["entropy", "old_log_probs", "response_mask", "responses"] + (["rollout_log_probs"] if calc else [])
        data = DataProto(batch=tq.kv_batch_get(keys=fresh, partition_id=pid, select_fields=fields).to_padded_tensor())
        actor = self.config.actor_rollout_ref.actor
        metrics["actor/entropy"] = agg_loss(
            loss_mat=data.batch["entropy"], loss_mask=data.batch["response_mask"],
            loss_agg_mode=actor.loss_agg_mode, loss_scale_factor=actor.get("loss_scale_factor", None),
        ).detach().item()
        if calc:
            metrics.update(calculate_debug_metrics(data))

    def _write_replay_fields(self, batch: KVBatchMeta, step: Optional[GroupStep]) -> KVBatchMeta:
        """The replay-aware loss's per-row fields on every row (see losses/replay_loss.py)."""
        pid = batch.partition_id
        data = tq.kv_batch_get(keys=batch.keys, partition_id=pid, select_fields=["response_mask", "old_log_probs"])
        stored = step.stored if step is not None else {}
        masks = data["response_mask"].unbind(0)
        is_replay, logprobs = [], []
        for key, old, mask in zip(batch.keys, data["old_log_probs"].unbind(0), masks, strict=True):
            rec = stored.get(key)
            is_replay.append(rec is not None)
            lp = old.float() if rec is None else rec
            if lp.numel() != mask.numel():
                raise ValueError(f"stored log-probs of {key} have {lp.numel()} entries for {mask.numel()} response tokens")
            logprobs.append(lp)
        n = int(self.config.actor_rollout_ref.rollout.n)
        mini = step.mini_rows if step is not None and step.replay_keys else int(self.config.actor_rollout_ref.actor.ppo_mini_batch_size) * n
        norm = minibatch_normalizer_fields(
            is_replay, [int(m.sum()) for m in masks], mini_batch_size=mini, dp_size=self._actor_dp_size(),
            shuffle=bool(self.config.actor_rollout_ref.actor.shuffle),
        )
        fields = {REPLAY_MASK_KEY: torch.tensor(is_replay, dtype=torch.float32), STORED_LOG_PROBS_KEY: _nested(logprobs), **norm}
        meta = tq.kv_batch_put(keys=batch.keys, partition_id=pid, fields=TensorDict(fields, batch_size=[len(batch)]))
        return KVBatchMeta(
            partition_id=pid, keys=list(batch.keys), tags=list(batch.tags),
            fields=list(meta.fields) if meta.fields else None, extra_info=dict(batch.extra_info or {}),
        )


def _object_column(value: Any) -> np.ndarray:
    arr = np.empty(1, dtype=object)
    arr[0] = value
    return arr


def _reward_input(row: dict) -> DataProto:
    """One row as the reward-loop worker's ``compute_score`` receives it from verl's agent loop."""
    prompts = torch.as_tensor(row["prompts"]).reshape(1, -1)
    responses = torch.as_tensor(row["responses"]).reshape(1, -1)
    input_ids = torch.cat([prompts, responses], dim=1)
    batch = TensorDict(
        {"prompts": prompts, "responses": responses, "input_ids": input_ids,
         "attention_mask": torch.ones_like(input_ids), "position_ids": torch.arange(input_ids.shape[1]).reshape(1, -1)},
        batch_size=1,
    )
    non_tensor = {k: _object_column(copy.deepcopy(v)) for k, v in row.items() if not isinstance(v, torch.Tensor)}
    non_tensor.update({
        "__num_turns__": _object_column(row.get("num_turns", 2)),
        "tool_extra_fields": _object_column({}),
        "prompt_len": _object_column(prompts.shape[1]),
        "response_len": _object_column(responses.shape[1]),
    })
    return DataProto(batch=batch, non_tensor_batch=non_tensor)


@register_trainer("dyjr")
class DyJRTrainer(ReplayTrainer):
    """DyJR: recent trajectories anchor the policy through the JS term only (``dyjr:`` node)."""
