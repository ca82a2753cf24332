"""DyJR as a verl 0.9.1 trainer mode: ``trainer.v1.trainer_mode=dyjr`` (the ``dyjr:`` node).

Recent trajectories anchor the policy through the divergence term only: the time-sensitive buffer
(:mod:`.buffer`) stores a compact copy of each admitted rollout; at every actor update the
replay core (:mod:`dyjr_verl.replay.update_strategy`) draws rows from it, places them in the
mini-batches outside every advantage, and the replay-aware loss gives them ``lambda * f_JS`` (or
forward KL, or the exact top-k JS: :mod:`.divergence`, :mod:`.topk`). The loss's drift metric
feeds the buffer's adaptive window.

With ``dyjr.js.estimator=topk`` the old-log-prob probe records each trajectory's top-k
distribution (:meth:`DyJRTrainer.topk_record_k`), the record travels with the trajectory into the
buffer and back onto its replayed row, and the actor update runs the loss as a logits processor.

Ablations (settings of this trainer, see :mod:`.config`): ``dyjr.buffer.frozen`` fills the buffer
at the first step only (:mod:`.buffer`); ``dyjr.replay.as_pg`` gives replayed rows the clipped PG
term (:mod:`.divergence`) with the GRPO advantage each trajectory had when it was collected: read
for the admitted rows only, kept as the trajectory's ``record`` (a float; ``as_pg`` excludes the
top-k record) and written back as the replayed row's ``advantages``.
"""

from __future__ import annotations

import verl.trainer.ppo.v1  # noqa: F401, I001  (first: see dyjr_verl/plugin.py)
from typing import Any, Optional

import torch
from tensordict import TensorDict
from verl.trainer.ppo.v1.trainer_base import register_trainer

from dyjr_verl import plugin
from dyjr_verl.diagnostics.topk_record import TOPK_RECORD_PREFIX
from dyjr_verl.methods.dyjr.buffer import TimeSensitiveBuffer, buffer_digest
from dyjr_verl.methods.dyjr.config import DyJRConfig
from dyjr_verl.methods.dyjr.divergence import dyjr_loss_spec
from dyjr_verl.methods.dyjr.topk import TOPK_JS_TERM, make_topk_js_replay_loss_fn, record_fields, record_read_fields, take_record
from dyjr_verl.plan import rollouts_per_step
from dyjr_verl.replay.rows import Trajectory
from dyjr_verl.replay.terms import ReplayLossSpec
from dyjr_verl.replay.update_strategy import ReplayTrainer, UpdateRows


@register_trainer("dyjr")
class DyJRTrainer(ReplayTrainer):
    """DyJR: recent trajectories anchor the policy through the JS term only (``dyjr:`` node)."""

    config_node = "dyjr"
    config_class = DyJRConfig
    metric_prefix = "dyjr/"

    def __init__(self, config: Any):
        self._rows_per_step = rollouts_per_step(config)  # sizes dyjr.buffer.capacity=null (build_store runs first)
        super().__init__(config)

    # -- the method ----------------------------------------------------------------------------------
    def build_store(self) -> TimeSensitiveBuffer:
        return TimeSensitiveBuffer(self.method_config.buffer, rows_per_step=self._rows_per_step)

    def loss_spec(self) -> ReplayLossSpec:
        return dyjr_loss_spec(self.method_config, actor=self.config.actor_rollout_ref.actor)

    @property
    def replays_as_pg(self) -> bool:
        return bool(self.method_config.replay.as_pg)

    def make_loss_fn(self, actor_cfg: Any, spec: ReplayLossSpec) -> Any:
        if spec.kind == TOPK_JS_TERM:  # the engine calls it as logits processor too
            return make_topk_js_replay_loss_fn(actor_cfg, spec)
        return super().make_loss_fn(actor_cfg, spec)

    def store_metrics(self) -> dict[str, float]:
        return self.store.metrics(prefix=f"{self.metric_prefix}buffer/")

    def store_digest(self, state: dict) -> str:
        return buffer_digest(state)

    # -- the update strategy's hooks -------------------------------------------------------------------
    def target_replay_rows(self, fresh_rows: int) -> int:
        if len(self.store) < self.method_config.replay.min_buffer:
            return 0
        return self.method_config.replay.num_rows(fresh_rows)

    def draw_rows(self, n: int) -> list[Trajectory]:
        rows = self.store.sample(n, self._replay_rng)
        if 0 < len(rows) < n:
            # A store holding fewer rows than the placement (a multiple of dp x micro per mini-batch) would
            # be rounded down to no replay at all -- with a sparse reward, for most of the run (SmolLM2: 1-5
            # correct rollouts per step). The term is a mean over replayed tokens, so drawing the held rows
            # with replacement keeps its weight and its expectation; replay/distinct_rows shows the reuse.
            rows += [rows[i] for i in self._replay_rng.integers(len(rows), size=n - len(rows)).tolist()]
        return rows

    def admits(self, reward: float) -> bool:
        # a filled frozen buffer takes nothing: its rows are not even read
        return self.store.accepting and self.store.admits_reward(reward)

    def store_rows(self, step: int, trajectories: list[Trajectory], rejected: int) -> dict[str, float]:
        self.store.push(step, trajectories, rejected=rejected, rng=self._replay_rng)  # seeded overflow subset
        return {}

    def before_update(self, step: int) -> None:
        self.store.advance(step)  # evict by age before drawing

    def recorded_log_probs_key(self) -> str:
        return self.method_config.buffer.logprobs_field  # dyjr.buffer.logprobs

    def after_update(self, update: UpdateRows, metrics: dict) -> None:
        drift = metrics.get("actor/replay/drift")
        if update.drawn and drift is not None:
            self.store.report_drift(drift)

    # -- the stored advantage (replay.as_pg) ------------------------------------------------------------
    def admitted_read_fields(self) -> list[str]:
        return ["advantages"] if self.replays_as_pg else []

    def admitted_record(self, record: Any, fields: dict[str, torch.Tensor]) -> Any:
        return trajectory_advantage(fields["advantages"]) if self.replays_as_pg else record

    def replay_per_token(self, traj: Trajectory) -> dict[str, torch.Tensor]:
        if not self.replays_as_pg:
            return {}
        return {"advantages": torch.full((len(traj.response_ids),), float(traj.record), dtype=torch.float32)}

    # -- the top-k record (estimator=topk) ----------------------------------------------------------------
    def topk_record_k(self) -> int:
        return int(self.method_config.replay_fingerprint()["record_k"])  # one rule for the trainer and preflight

    def update_extra_info(self) -> dict[str, Any]:
        # the engine calls the loss as logits processor first (exact top-k JS)
        return {"distillation_use_topk": True} if self.topk_record_k() else {}

    def record_read_fields(self) -> list[str]:
        k = self.topk_record_k()
        return record_read_fields(k) if k else []

    def take_records(self, data: TensorDict) -> Optional[list]:
        k = self.topk_record_k()
        return take_record(data, k) if k else None

    def record_fields(self, records: list) -> dict[str, torch.Tensor]:
        return record_fields(records)

    def dropped_field(self, name: str) -> bool:
        return name.startswith(TOPK_RECORD_PREFIX)


def trajectory_advantage(advantages: torch.Tensor) -> float:
    """The one advantage of an outcome-level estimator's row (the same value on every response token,
    zeros where verl masked a token); refuses per-token advantages, which a scalar cannot store."""
    a = advantages.detach().float().reshape(-1)
    values = a[a != 0]
    if values.numel() == 0:
        return 0.0
    lo, hi = float(values.min()), float(values.max())
    if hi - lo > 1e-5 * max(1.0, abs(hi)):
        raise ValueError(f"dyjr.replay.as_pg stores one advantage per trajectory, but a row's advantages vary over "
                         f"its tokens ([{lo:.4g}, {hi:.4g}]): use an outcome-level algorithm.adv_estimator (e.g. grpo)")
    return float(values.mean())


plugin.register_pending(__name__)  # last: see dyjr_verl/plugin.py
