"""verl's sync trainer with the old-log-prob probe: Rank-k metrics for every method (GRPO too).

:class:`ProbedSyncTrainer` is verl's ``PPOTrainerSync`` plus two things:

* the ``"sync"`` masquerade: verl compares ``self.trainer_mode`` with the literal ``"sync"`` in
  several places (replay-buffer class, checkpoint TQ state, refill, ...), so ``trainer_mode`` reads
  ``"sync"`` while the registered name (``sync_rank_k``, ``dyjr``, ...) stays selectable;
* the probe (:mod:`dyjr_verl.diagnostics.probe`): verl's old-log-prob forward runs with the loss
  as a logits processor, which returns the Rank-1..k / entropy sums of the step's response
  positions (logged as ``rank_k/*``) and, when a subclass asks for it (:meth:`topk_record_k`), the
  top-k record of each trajectory. The installed loss is the method's loss wrapped by
  :func:`~dyjr_verl.diagnostics.probe.with_probe`, which leaves the actor update unchanged.

Registered as trainer mode ``sync_rank_k`` = verl's GRPO/PPO sync trainer + the Rank-k metrics
(``trainer.v1.trainer_mode=sync_rank_k``; the GRPO recipes use it). The replay trainers
(:mod:`dyjr_verl.replay.base`) derive from it.

Import order: ``verl.trainer.ppo.v1`` is imported first (see :mod:`dyjr_verl.plugin`).
"""

from __future__ import annotations

import verl.trainer.ppo.v1  # noqa: F401, I001  (first: see dyjr_verl/plugin.py)
import contextlib
import functools
import logging
import os
from typing import Any, Callable, Optional

from omegaconf import DictConfig
from transfer_queue import KVBatchMeta
from verl.trainer.ppo.v1.trainer_base import register_trainer
from verl.trainer.ppo.v1.trainer_sync import PPOTrainerSync
from verl.utils.config import omega_conf_to_dataclass

from dyjr_verl import plugin
from dyjr_verl.diagnostics.config import DiagnosticsConfig, probe_unsupported
from dyjr_verl.diagnostics.probe import RANK_K_FLAG, reduce_rank_k_metrics, with_probe
from dyjr_verl.diagnostics.topk_record import TOPK_RECORD_FLAG

logger = logging.getLogger(__name__)
logger.setLevel(os.getenv("VERL_LOGGING_LEVEL", "INFO"))

_PROBE_KEYS = (RANK_K_FLAG, TOPK_RECORD_FLAG, "distillation_use_topk")


class ProbedSyncTrainer(PPOTrainerSync):
    """verl's sync trainer + Rank-k metrics from the old-log-prob forward (module docstring)."""

    # -- verl's literal "sync" checks --------------------------------------------------------------
    @property
    def trainer_mode(self) -> str:
        return "sync"

    @trainer_mode.setter
    def trainer_mode(self, value: str) -> None:
        self.registered_mode = value

    def __init__(self, config: DictConfig):
        node = config.get("diagnostics", None)
        self.diagnostics = DiagnosticsConfig.from_omegaconf(node, path="diagnostics")
        super().__init__(config)

    # -- hooks for subclasses ----------------------------------------------------------------------
    def method_loss_fn(self, actor_cfg: Any) -> Optional[Callable]:
        """The method's actor loss for ``set_loss_fn``; None keeps verl's (``ppo_loss``)."""
        return None

    def topk_record_k(self) -> int:
        """k of the top-k record the probe computes per trajectory (0: none)."""
        return 0

    # -- probe settings ------------------------------------------------------------------------------
    @functools.cached_property
    def probe_settings(self) -> tuple[int, int]:
        """(rank_k, record_k) the old-log-prob pass computes; (0, 0) when it cannot run."""
        rank_k, record_k = int(self.diagnostics.rank_k), int(self.topk_record_k())
        if not (rank_k or record_k):
            return 0, 0
        why = probe_unsupported(self.config)
        if why is None:
            return rank_k, record_k
        if record_k:  # the preflight rejects this before Ray starts; keep the trainer honest too
            raise ValueError(f"{self.registered_mode}: the top-k record needs verl's old-log-prob forward: not with {why}")
        logger.warning(f"{self.registered_mode}: Rank-k metrics off: {why}")
        return 0, 0

    # -- verl hooks ----------------------------------------------------------------------------------
    def on_init_end(self):
        super().on_init_end()
        actor_cfg = omega_conf_to_dataclass(self.config.actor_rollout_ref.actor)
        loss = self.method_loss_fn(actor_cfg)
        if any(self.probe_settings):
            if loss is None:
                from verl.workers.utils.losses import ppo_loss

                loss = functools.partial(ppo_loss, config=actor_cfg)
            loss = with_probe(loss)
        if loss is not None:
            self.actor_rollout_wg.set_loss_fn(loss)
            logger.info(f"{self.registered_mode}: loss installed (probe rank_k, record_k = {self.probe_settings})")

    def _compute_old_log_prob(self, batch: KVBatchMeta, metrics: dict) -> KVBatchMeta:
        rank_k, record_k = self.probe_settings
        if not (rank_k or record_k):
            return super()._compute_old_log_prob(batch, metrics)
        captured: dict[str, Any] = {}
        with self._probed_compute_log_prob(rank_k, record_k, captured):
            out = super()._compute_old_log_prob(batch, metrics)
        worker_metrics = captured.get("metrics") or {}
        if isinstance(worker_metrics, list):  # one dict per worker; each is already all-gathered over dp
            worker_metrics = worker_metrics[0] if worker_metrics else {}
        metrics.update(reduce_rank_k_metrics(worker_metrics))
        return out

    @contextlib.contextmanager
    def _probed_compute_log_prob(self, rank_k: int, record_k: int, captured: dict):
        """For one ``compute_log_prob`` call: run the loss (as processor + probe) in the forward;
        the flags are removed again so the actor update never sees them."""
        wg = self.actor_rollout_wg
        original = wg.compute_log_prob

        def compute_log_prob(meta: KVBatchMeta, *args, **kwargs):
            meta.extra_info.update({"compute_loss": True, "distillation_use_topk": True,
                                    RANK_K_FLAG: rank_k, TOPK_RECORD_FLAG: record_k})
            try:
                out = original(meta, *args, **kwargs)
            finally:
                for key in _PROBE_KEYS:
                    meta.extra_info.pop(key, None)
                meta.extra_info["compute_loss"] = False
            info = getattr(out, "extra_info", None) or {}
            captured["metrics"] = info.get("metrics", {}) if isinstance(info, dict) else {}
            if isinstance(out, KVBatchMeta) and isinstance(out.extra_info, dict):
                for key in _PROBE_KEYS:
                    out.extra_info.pop(key, None)
            return out

        wg.compute_log_prob = compute_log_prob
        try:
            yield
        finally:
            wg.compute_log_prob = original


@register_trainer("sync_rank_k")
class RankKSyncTrainer(ProbedSyncTrainer):
    """``trainer.v1.trainer_mode=sync_rank_k``: verl's sync trainer (GRPO/PPO, verl's loss) that
    also logs the Rank-k metrics (``diagnostics.rank_k``, default 8)."""


plugin.register_pending(__name__)  # last: see dyjr_verl/plugin.py
