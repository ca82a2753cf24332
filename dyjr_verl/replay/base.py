"""The abstract replay trainer on verl 0.9.1's v1 (TransferQueue) trainer, without forking verl.

:class:`ReplayTrainerBase` is verl's ``PPOTrainerSync`` (through
:class:`~dyjr_verl.diagnostics.trainer.ProbedSyncTrainer`: the ``"sync"`` masquerade and the Rank-k
probe) plus what every replay method shares: its typed config node, its store and RNG
(checkpointed inside verl's checkpoint, :mod:`.checkpoint`), the replay-aware loss installation
(:mod:`.loss`), the mini-batch growth and the actor's data-parallel shape. It has no defaults of
any method: a method sets :attr:`config_class` and implements :meth:`build_store` and
:meth:`loss_spec`.

Rows join a step at one of two places (the two strategies):

* at the actor update (:mod:`.update_strategy`), outside every advantage, trained only through the
  replay term of the loss;
* inside their prompt's GRPO group before advantages (:mod:`.group_strategy`).

Import order: ``verl.trainer.ppo.v1`` is imported first (see :mod:`dyjr_verl.plugin`).
"""

from __future__ import annotations

import verl.trainer.ppo.v1  # noqa: F401, I001  (first: see dyjr_verl/plugin.py)
import contextlib
import logging
import os
from typing import Any, ClassVar, Optional

import numpy as np
from omegaconf import DictConfig
from transfer_queue import KVBatchMeta

from dyjr_verl import plugin
from dyjr_verl.diagnostics.trainer import ProbedSyncTrainer
from dyjr_verl.replay.checkpoint import (
    check_fingerprint, load_replay_state, missing_state_error, replay_state_folder, restore_store, save_replay_state,
    mismatch_remedy, resume_folder, start_empty_remedy,
)
from dyjr_verl.replay.config import replay_setting, run_seed
from dyjr_verl.replay.layout import UpdateShape, forward_row_multiple, training_micro_batch
from dyjr_verl.replay.terms import ReplayLossSpec, make_replay_loss_fn

logger = logging.getLogger(__name__)
logger.setLevel(os.getenv("VERL_LOGGING_LEVEL", "INFO"))


class ReplayTrainerBase(ProbedSyncTrainer):
    """Sync PPO trainer with a method's config node, replay store and replay-aware loss."""

    #: the method's hydra node (``dyjr``, ``rlep``, ...) and typed config class
    config_node: ClassVar[str]
    config_class: ClassVar[type]
    #: prefix of the method's trainer-side metrics
    metric_prefix: ClassVar[str]

    def __init__(self, config: DictConfig):
        self.method_config = self.config_class.from_omegaconf(config.get(self.config_node), path=self.config_node)
        seed, source = self.replay_seed(config)
        print(f"{self.config_node}: replay seed {seed} ({source})", flush=True)
        self._replay_rng = np.random.default_rng(seed)
        self.store = self.build_store()
        super().__init__(config)

    # -- hooks for a method ----------------------------------------------------------------------------
    def build_store(self) -> Any:
        raise NotImplementedError

    def loss_spec(self) -> Optional[ReplayLossSpec]:
        """The replay term of the loss installed with ``set_loss_fn``; None keeps verl's loss
        (replayed rows are then ordinary rows, as in RLEP)."""
        raise NotImplementedError

    def make_loss_fn(self, actor_cfg: Any, spec: ReplayLossSpec) -> Any:
        """The ``set_loss_fn`` loss for ``spec`` (a method with its own loss entry point overrides it)."""
        return make_replay_loss_fn(actor_cfg, spec)

    def replay_setting(self, name: str) -> tuple[Any, str]:
        """(value, full key) of one of the method's replay settings (``seed``, ``resume_empty``)."""
        return replay_setting(self.method_config, name, self.config_node)  # as the start-up check reads it

    def replay_seed(self, config: DictConfig) -> tuple[int, str]:
        """(seed, where it comes from): the method's seed when set, else the run's (:func:`run_seed`)."""
        seed, key = self.replay_setting("seed")
        return (int(seed), key) if seed is not None else run_seed(config)

    def replay_enabled(self) -> bool:
        return bool(self.method_config.enable)

    def store_metrics(self) -> dict[str, float]:
        return self.store.metrics(prefix=f"{self.metric_prefix}store/")

    def store_digest(self, state: dict) -> str:
        """Content digest of a saved store state (printed on resume; tests compare it)."""
        return ""

    def state_fingerprint(self) -> dict[str, Any]:
        """What the saved rows mean and how they are laid out; a resume with another fingerprint is
        refused at start-up (:mod:`dyjr_verl.preflight`, from the config alone) and again at load,
        instead of failing later while building replay rows. Settings the store re-applies on load
        (capacity, ages, replay size) are not in it. The method's config node computes it."""
        return self.method_config.replay_fingerprint()

    def extra_state(self) -> dict[str, Any]:
        """Method state saved beside the store (e.g. Ex-GRPO's activation flag)."""
        return {}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        return None

    def update_extra_info(self) -> dict[str, Any]:
        """Non-tensor flags the actor update needs besides verl's (e.g. a logits-processor loss)."""
        return {}

    # -- the loss --------------------------------------------------------------------------------------
    @property
    def replay_loss_installed(self) -> bool:
        return self.replay_enabled() and self.loss_spec() is not None

    def method_loss_fn(self, actor_cfg: Any):
        if not self.replay_loss_installed:
            return None
        spec = self.loss_spec()
        logger.info(f"{self.registered_mode}: replay-aware loss ({spec})")
        return self.make_loss_fn(actor_cfg, spec)

    # -- the actor's shape -------------------------------------------------------------------------------
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
        extra = self.update_extra_info()

        def update_actor(batch: KVBatchMeta, *args, **kwargs):
            batch.extra_info["mini_batch_size"] = rows
            batch.extra_info["global_batch_size"] = rows
            batch.extra_info.update(extra)
            return original(batch, *args, **kwargs)

        wg.update_actor = update_actor
        try:
            yield
        finally:
            wg.update_actor = original

    # -- checkpointing -----------------------------------------------------------------------------------
    def _save_checkpoint(self):
        # first: verl's save ends with its completion marker, so no checkpoint it resumes from lacks
        # our state; inside actor/, which verl's rotation deletes and its Megatron manager uploads
        step_folder = os.path.join(self.config.trainer.default_local_dir, f"global_step_{self.global_steps}")
        state = {"store": self.store.state_dict(), "rng": self._replay_rng.bit_generator.state,
                 "fingerprint": self.state_fingerprint()}
        extra = self.extra_state()
        if extra:
            state["extra"] = extra
        save_replay_state(replay_state_folder(step_folder), state)
        super()._save_checkpoint()

    def _load_checkpoint(self):
        super()._load_checkpoint()
        if self.global_steps <= 0:
            return
        empty_ok, empty_key = self.replay_setting("resume_empty")
        start_empty = start_empty_remedy(empty_key)
        path, state = load_replay_state(replay_state_folder(self._resumed_folder()))
        if state is None:
            if not empty_ok:
                raise missing_state_error(self.global_steps, path, empty_key)
            print(f"WARNING: {self.config_node}: resumed at step {self.global_steps} without {path}: the replay store "
                  f"starts empty ({empty_key}=true)", flush=True)
            return
        check_fingerprint(state, self.state_fingerprint(), path, mismatch_remedy(empty_key))
        restore_store(self.store, state, path, start_empty)
        self._replay_rng.bit_generator.state = state["rng"]
        self.load_extra_state(state.get("extra", {}))
        # printed (not logged) so that the driver's log always shows it; tests compare it
        print(f"{self.config_node}: replay store restored from {path}: {len(self.store)} rows, "
              f"restored_digest={self.store_digest(self.store.state_dict())}", flush=True)

    def _resumed_folder(self) -> str:
        return resume_folder(self.config.trainer)  # the folder verl's _load_checkpoint has just loaded


plugin.register_pending(__name__)  # last: see dyjr_verl/plugin.py
