"""Ex-GRPO (Learning to Reason from Experience, arXiv 2510.02245) as a verl 0.9.1 trainer mode:
``trainer.v1.trainer_mode=exgrpo``.

Per step (K = ``rollout.n``):

1. **Prompts** (:meth:`.experience.Experience.next_prompts`). Retired questions (all K rollouts
   correct once) are skipped in the dataloader stream. Once replay is active, a share rho
   (``exgrpo.replay.size``, 0.5) of the batch's prompts are *experience questions* drawn from the
   pool by bucket weights N(k; K/2, 1); they are re-issued with verl's per-prompt rollout count
   ``__rollout_n__ = K - 1`` (the agent loop honours it), the rest are fresh dataloader prompts.
2. **Replay row** (:meth:`.experience.Experience.choose_rows`, called by the shared group-replay stage before
   ``_balance_batch``). For each experience group, the stored trajectory with the lowest mean
   token entropy under the current policy (one batched ``compute_log_prob`` over the question's
   stored trajectories) joins the K - 1 fresh rollouts, with its stored score and recorded
   log-probs. verl then computes the group advantage over the K rows.
3. **Loss.** Fresh tokens: verl's ``ppo_loss``. Replayed tokens: ``-A * w / (w + beta)``,
   ``w = pi_theta / pi_recorded``, beta = 0.1, unclipped (the ``shaped_pg`` replay term), one joint
   token normaliser.
4. **Pool** (:meth:`.experience.Experience.update_pool`). Nothing is collected until the first step whose
   fresh-rollout accuracy exceeds 0.35 (official code: purely on-policy until then); from that step
   on, for every group with k correct of K: k = K retires the question; 0 < k <= K - 1 stores its
   correct rollouts (deduplicated by tokens) with their rollout-time log-probs and moves it to
   bucket k. Replay starts on the next step and stays on.

Pool, buckets and retirement: :class:`.pool.ExperiencePool`; settings: :class:`.config.ExGRPOConfig`;
the loss: :mod:`.loss`; the shared machinery: :class:`dyjr_verl.replay.group_strategy.GroupReplayTrainer`.
"""

from __future__ import annotations

import verl.trainer.ppo.v1  # noqa: F401, I001  (first: see dyjr_verl/plugin.py)
from typing import Any

from omegaconf import DictConfig
from tensordict import TensorDict
from transfer_queue import KVBatchMeta
from verl.trainer.ppo.v1.trainer_base import register_trainer

from dyjr_verl import plugin
from dyjr_verl.methods.exgrpo.config import ExGRPOConfig
from dyjr_verl.methods.exgrpo.experience import Experience
from dyjr_verl.methods.exgrpo.loss import exgrpo_loss_spec
from dyjr_verl.methods.exgrpo.pool import ExperiencePool, pool_state_digest
from dyjr_verl.replay.codec import td_column
from dyjr_verl.replay.group_rows import GroupStep, PromptGroup, ReplayRowSpec
from dyjr_verl.replay.group_strategy import GroupReplayTrainer
from dyjr_verl.replay.stored_logprobs import LOGPROBS_FIELDS
from dyjr_verl.replay.terms import ReplayLossSpec


@register_trainer("exgrpo")
class ExGRPOTrainer(GroupReplayTrainer):
    """Ex-GRPO: online pool, bucket-weighted questions, lowest-entropy trajectory, shaped IS loss."""

    config_node = "exgrpo"
    config_class = ExGRPOConfig
    metric_prefix = "exgrpo/"

    def __init__(self, config: DictConfig):
        self._K = int(config.actor_rollout_ref.rollout.n)
        super().__init__(config)

    # -- method hooks --------------------------------------------------------------------------------
    def build_store(self) -> ExperiencePool:
        cfg = self.method_config
        pool = ExperiencePool(
            self._K, lbound=cfg.pool.lbound, rbound=cfg.pool.rbound, max_per_question=cfg.pool.max_per_question,
            weighting=cfg.select.weighting, sigma=cfg.select.sigma,
        )
        self.experience = Experience(cfg, self._K, pool, self._replay_rng, prefix=self.metric_prefix)
        return pool

    def loss_spec(self) -> ReplayLossSpec:
        return exgrpo_loss_spec(self.method_config)

    def store_metrics(self) -> dict[str, float]:
        return self.store.metrics(prefix=f"{self.metric_prefix}pool/")

    def store_digest(self, state: dict) -> str:
        return pool_state_digest(state)

    def extra_state(self) -> dict[str, Any]:
        return self.experience.state()

    def load_extra_state(self, state: dict[str, Any]) -> None:
        self.experience.load_state(state)

    # -- 1. prompts ----------------------------------------------------------------------------------
    def _next_train_batch(self, num_prompts: int | None = None) -> TensorDict:
        if not self.replay_enabled():
            return super()._next_train_batch(num_prompts)
        return self.experience.next_prompts(
            int(num_prompts or self.config.data.train_batch_size), refill=num_prompts is not None,
            fetch=self._fetch_one_gen_batch, max_fetches=len(self.train_dataloader), global_steps=self.global_steps,
        )

    # -- 2. replay row ---------------------------------------------------------------------------------
    def plan_group_replay(self, groups: list[PromptGroup], metrics: dict) -> list[ReplayRowSpec]:
        return self.experience.choose_rows(groups, self.policy_entropy, max_len=int(self.config.data.max_response_length),
                                           step=int(self.global_steps), metrics=metrics)

    # -- 4. pool ---------------------------------------------------------------------------------------
    def recorded_log_probs_key(self) -> str:
        # a choice this config cannot produce is refused at start-up (ExGRPOConfig.verl_problems)
        return LOGPROBS_FIELDS[self.method_config.pool.logprobs]

    def step_fields(self) -> list[str]:
        # the pool update reads the same pass as the loss fields (one TransferQueue read)
        own = ["uid", "rm_scores", "responses", self.recorded_log_probs_key()]
        return list(dict.fromkeys([*super().step_fields(), *own]))

    def after_group_step(self, batch: KVBatchMeta, step: GroupStep, metrics: dict) -> None:
        data, keys, tags = step.data, step.data_keys, step.data_tags
        if data is None:  # no actor update this step (critic warm-up): read it here
            keys, tags = list(batch.keys), list(batch.tags)
            data = self.tq.kv_batch_get(keys=keys, partition_id=batch.partition_id, select_fields=self.step_fields())
        replay = set(step.replay_keys)
        columns = zip(keys, tags, td_column(data, "uid"), data["rm_scores"].unbind(0), data["responses"].unbind(0),
                      data[self.recorded_log_probs_key()].unbind(0), strict=True)
        rows = [(key, key in replay, str(uid), float(rm.float().sum()), resp, lp)
                for key, tag, uid, rm, resp, lp in columns if not tag.get("is_padding", False)]
        self.experience.update_pool(step.groups, rows, step=int(self.global_steps), metrics=metrics)


plugin.register_pending(__name__)  # last: see dyjr_verl/plugin.py
