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

Trainer-mode caveat: verl compares ``self.trainer_mode`` with the literal ``"sync"`` in several
places (replay-buffer class, checkpoint TQ state, refill, ...), so ``trainer_mode`` is a property
that reads ``"sync"`` while the registered name stays selectable.
"""

from __future__ import annotations

import contextlib
import logging
import os
import pickle
import uuid
from typing import Any

import numpy as np
import torch
import transfer_queue as tq
from omegaconf import DictConfig
from tensordict import NonTensorStack, TensorDict
from transfer_queue import KVBatchMeta
from verl.trainer.ppo.v1.trainer_base import register_trainer
from verl.trainer.ppo.v1.trainer_sync import PPOTrainerSync
from verl.utils.config import omega_conf_to_dataclass

from dyjr_verl.config import DyJRConfig
from dyjr_verl.losses.replay_loss import (
    REPLAY_MASK_KEY,
    STORED_LOG_PROBS_KEY,
    ReplayLossSpec,
    make_replay_loss_fn,
    minibatch_normalizer_fields,
)
from dyjr_verl.replay.buffer import TimeSensitiveBuffer, Trajectory
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
# The shared replay trainer
# ------------------------------------------------------------------------------------------------


class ReplayTrainer(PPOTrainerSync):
    """Sync PPO trainer with a replay hook in ``_update_actor`` (see the module docstring)."""

    #: hydra node holding the method's settings, e.g. ``dyjr``
    config_node: str = "dyjr"
    #: metric prefix for the method's trainer-side metrics
    metric_prefix: str = "dyjr/"

    # -- verl's literal "sync" checks --------------------------------------------------------------
    @property
    def trainer_mode(self) -> str:
        return "sync"

    @trainer_mode.setter
    def trainer_mode(self, value: str) -> None:
        self.registered_mode = value

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

    def loss_spec(self) -> ReplayLossSpec:
        return ReplayLossSpec.from_dyjr_config(self.method_config)

    def replay_enabled(self) -> bool:
        return bool(self.method_config.enable)

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

    def store_metrics(self) -> dict[str, float]:
        return self.store.metrics(prefix=f"{self.metric_prefix}buffer/")

    # -- verl hooks ----------------------------------------------------------------------------------
    def on_init_end(self):
        super().on_init_end()
        if self.replay_enabled():
            actor_cfg = omega_conf_to_dataclass(self.config.actor_rollout_ref.actor)
            self.actor_rollout_wg.set_loss_fn(make_replay_loss_fn(actor_cfg, self.loss_spec()))
            logger.info(f"{self.registered_mode}: replay-aware loss installed ({self.loss_spec()})")

    def _update_actor(self, batch: KVBatchMeta, metrics: dict) -> KVBatchMeta:
        if not self.replay_enabled():
            return super()._update_actor(batch, metrics)
        step = int(self.global_steps)
        if hasattr(self.store, "advance"):
            self.store.advance(step)

        data = tq.kv_batch_get(keys=batch.keys, partition_id=batch.partition_id)
        fresh_rows = td_to_rows(data)
        real = [not tag.get("is_padding", False) for tag in batch.tags]

        n = int(self.config.actor_rollout_ref.rollout.n)
        mini = int(self.config.actor_rollout_ref.actor.ppo_mini_batch_size) * n
        dp = self._actor_dp_size()
        fresh_total = len(batch)
        num_mb = fresh_total // mini
        multiple = self._replay_row_multiple(dp)
        per_mb = self._replay_rows_per_minibatch(sum(real), num_mb, multiple)
        drawn = self.draw_rows(per_mb * num_mb) if per_mb else []
        per_mb = len(drawn) // num_mb if num_mb else 0
        per_mb -= per_mb % multiple
        drawn = drawn[: per_mb * num_mb]

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
        enlarged = KVBatchMeta(
            partition_id=batch.partition_id, keys=all_keys, tags=all_tags,
            fields=list(meta.fields) if meta.fields else None, extra_info=dict(batch.extra_info or {}),
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
            f"{self.metric_prefix}replay/tokens": float(sum(t.num_tokens for t in drawn)),
            f"{self.metric_prefix}replay/mean_age": float(np.mean(ages)) if ages else 0.0,
            f"{self.metric_prefix}replay/share": len(drawn) / float(len(drawn) + fresh_total),
        })
        return batch

    # -- helpers -------------------------------------------------------------------------------------
    def _replay_rows_per_minibatch(self, fresh_real_rows: int, num_mb: int, multiple: int) -> int:
        if num_mb == 0:
            return 0
        target = self.target_replay_rows(fresh_real_rows)
        per_mb = target // num_mb
        return per_mb - per_mb % multiple

    def _replay_row_multiple(self, dp: int) -> int:
        """Replay rows per mini-batch must keep every rank's share a whole number of micro-batches
        (verl asserts it in ``prepare_micro_batches``) unless micro-batches are sized by tokens."""
        actor = self.config.actor_rollout_ref.actor
        if actor.get("use_dynamic_bsz", False):
            return dp
        return dp * int(actor.ppo_micro_batch_size_per_gpu)

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

    # -- checkpointing -------------------------------------------------------------------------------
    def _save_checkpoint(self):
        super()._save_checkpoint()
        folder = os.path.join(self.config.trainer.default_local_dir, f"global_step_{self.global_steps}")
        os.makedirs(folder, exist_ok=True)
        state = {"store": self.store.state_dict(), "rng": self._replay_rng.bit_generator.state}
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
            # printed (not logged) so that the driver's log always shows it; tests compare it
            print(f"dyjr: replay store restored from {path}: {len(self.store)} rows, "
                  f"restored_digest={buffer_digest(self.store.state_dict())}", flush=True)
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


@register_trainer("dyjr")
class DyJRTrainer(ReplayTrainer):
    """DyJR: recent trajectories anchor the policy through the JS term only (``dyjr:`` node)."""
