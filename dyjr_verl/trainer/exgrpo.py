"""Ex-GRPO (Learning to Reason from Experience, arXiv 2510.02245) as a verl 0.9.1 trainer mode:
``trainer.v1.trainer_mode=exgrpo``.

Per step (K = ``rollout.n``):

1. **Prompts** (:meth:`ExGRPOTrainer._next_train_batch`). Retired questions (all K rollouts
   correct once) are skipped in the dataloader stream. Once replay is active, a share rho
   (``exgrpo.replay.size``, 0.5) of the batch's prompts are *experience questions* drawn from the
   pool by bucket weights N(k; K/2, 1); they are re-issued with verl's per-prompt rollout count
   ``__rollout_n__ = K - 1`` (the agent loop honours it), the rest are fresh dataloader prompts.
2. **Replay row** (:meth:`plan_group_replay`, called by the shared group-replay stage before
   ``_balance_batch``). For each experience group, the stored trajectory with the lowest mean
   token entropy under the current policy (one batched ``compute_log_prob`` over the question's
   stored trajectories) joins the K - 1 fresh rollouts, with its stored score and recorded
   log-probs. verl then computes the group advantage over the K rows.
3. **Loss.** Fresh tokens: verl's ``ppo_loss``. Replayed tokens: ``-A * w / (w + beta)``,
   ``w = pi_theta / pi_recorded``, beta = 0.1, unclipped (the ``shaped_pg`` replay term), one joint
   token normaliser.
4. **Pool** (:meth:`after_group_step`). Nothing is collected until the first step whose
   fresh-rollout accuracy exceeds 0.35 (official code: purely on-policy until then); from that step
   on, for every group with k correct of K: k = K retires the question; 0 < k <= K - 1 stores its
   correct rollouts (deduplicated by tokens) with their rollout-time log-probs and moves it to
   bucket k. Replay starts on the next step and stays on.

Pool, buckets and retirement: :class:`dyjr_verl.replay.pools.ExperiencePool`; settings:
:class:`dyjr_verl.baselines.config.ExGRPOConfig`; the shared machinery:
:class:`dyjr_verl.trainer.replay_trainer.GroupReplayTrainer`.
"""

from __future__ import annotations

import copy
import logging
import os
import uuid
from collections import defaultdict
from typing import Any, Optional

import numpy as np
import torch
import transfer_queue as tq
from omegaconf import DictConfig
from tensordict import NonTensorData, TensorDict
from transfer_queue import KVBatchMeta
from verl.trainer.ppo.v1.trainer_base import register_trainer
from verl.utils import tensordict_utils as tu
from verl.utils.dataset.rl_dataset import collate_fn

from dyjr_verl.baselines.config import ExGRPOConfig
from dyjr_verl.losses.replay_loss import ReplayLossSpec
from dyjr_verl.replay.pools import ExperiencePool, PoolTrajectory, pool_state_digest, question_key
from dyjr_verl.trainer.replay_trainer import GroupReplayTrainer, GroupStep, PromptGroup, ReplayRowSpec, td_column

logger = logging.getLogger(__name__)
logger.setLevel(os.getenv("VERL_LOGGING_LEVEL", "INFO"))

ROLLOUT_N_KEY = "__rollout_n__"  # verl's per-prompt rollout count (agent_loop_tq.py, _run_prompt)
_NOT_PROMPT_FIELDS = ("uid", ROLLOUT_N_KEY)


def gen_batch_rows(batch: TensorDict) -> list[dict[str, Any]]:
    """A dataloader batch (verl's gen batch) as per-prompt dicts; batch-level scalars dropped."""
    n = int(batch.batch_size[0])
    columns: dict[str, list] = {}
    for key in batch.keys():
        value = batch.get(key)
        if isinstance(value, NonTensorData):
            continue
        if isinstance(value, torch.Tensor):
            columns[key] = list(value.unbind(0))
        else:
            columns[key] = list(value.tolist())
    return [{k: v[i] for k, v in columns.items()} for i in range(n)]


def rows_to_gen_batch(rows: list[dict[str, Any]], global_steps: int) -> TensorDict:
    """Inverse of :func:`gen_batch_rows` through verl's own collate function."""
    keys = set(rows[0]) if rows else set()
    for r in rows:
        if set(r) != keys:
            raise ValueError(f"prompt rows differ in their fields: {sorted(keys ^ set(r))} (one dataset per run)")
    batch = tu.get_tensordict(collate_fn(rows))
    tu.assign_non_tensor_data(batch, "global_steps", global_steps)
    return batch


def exgrpo_loss_spec(cfg: ExGRPOConfig) -> ReplayLossSpec:
    """Replayed tokens: ``-A * w/(w + beta)`` (the ``shaped_pg`` replay term), one joint normaliser."""
    loss = cfg.loss
    return ReplayLossSpec(
        kind="shaped_pg", coef=loss.coef, beta=loss.beta, log_u_clamp=loss.log_u_clamp, normalizer=loss.normalizer
    )


def row_question(row: dict[str, Any]) -> str:
    return question_key(row.get("raw_prompt"), row.get("data_source"))


@register_trainer("exgrpo")
class ExGRPOTrainer(GroupReplayTrainer):
    """Ex-GRPO: online pool, bucket-weighted questions, lowest-entropy trajectory, shaped IS loss."""

    config_node = "exgrpo"
    metric_prefix = "exgrpo/"

    def __init__(self, config: DictConfig):
        self._K = int(config.actor_rollout_ref.rollout.n)
        self._active = False
        self._last_accuracy: Optional[float] = None
        self._issued: dict[str, tuple[str, dict]] = {}  # uid -> (question, prompt row) of issued prompts
        self._experience: dict[str, str] = {}  # uid -> question, experience prompts not trained on yet
        self._carry: list[dict] = []  # dataloader rows fetched while skipping retired ones, used next
        self._skipped_retired = 0
        super().__init__(config)

    # -- method hooks --------------------------------------------------------------------------------
    def parse_method_config(self, config: DictConfig) -> ExGRPOConfig:
        return ExGRPOConfig.from_omegaconf(config.get(self.config_node), path=self.config_node)

    def build_store(self) -> ExperiencePool:
        cfg = self.method_config
        return ExperiencePool(
            self._K, lbound=cfg.pool.lbound, rbound=cfg.pool.rbound, max_per_question=cfg.pool.max_per_question,
            weighting=cfg.select.weighting, sigma=cfg.select.sigma,
        )

    def loss_spec(self) -> ReplayLossSpec:
        return exgrpo_loss_spec(self.method_config)

    def store_metrics(self) -> dict[str, float]:
        return self.store.metrics(prefix=f"{self.metric_prefix}pool/")

    def store_digest(self, state: dict) -> str:
        return pool_state_digest(state)

    def extra_state(self) -> dict[str, Any]:
        return {"active": self._active, "last_accuracy": self._last_accuracy}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        self._active = bool(state.get("active", False))
        self._last_accuracy = state.get("last_accuracy")

    # -- 1. prompts ----------------------------------------------------------------------------------
    def _next_train_batch(self, num_prompts: int | None = None) -> TensorDict:
        """The step's prompts: experience questions (once replay is on) + fresh dataloader prompts
        that are not retired. The dataloader is read only for the fresh part, so rho of the batch
        comes from the pool as in Ex-GRPO (rows fetched but not used wait in ``_carry``)."""
        if not self.replay_enabled():
            return super()._next_train_batch(num_prompts)
        wanted = int(num_prompts or self.config.data.train_batch_size)
        n_exp = 0
        # refills of failed groups (num_prompts given) stay fresh: the batch's mix is set once
        if num_prompts is None and self._replay_ready():
            n_exp = min(self.method_config.num_experience_questions(wanted), len(self.store))
        exp_rows = []
        for q in self.store.sample_questions(n_exp, self._replay_rng) if n_exp else []:
            row = copy.deepcopy(self.store.prompt_row(q))
            row["uid"] = str(uuid.uuid4())
            exp_rows.append(row)
            self._experience[row["uid"]] = q
        fresh = self._take_fresh(wanted - len(exp_rows))
        for row in fresh + exp_rows:
            prompt = {k: v for k, v in row.items() if k not in _NOT_PROMPT_FIELDS}
            self._issued[row["uid"]] = (self._experience.get(row["uid"]) or row_question(row), prompt)
        if exp_rows:
            for row in fresh:
                row[ROLLOUT_N_KEY] = self._K
            for row in exp_rows:
                row[ROLLOUT_N_KEY] = self._K - 1  # + 1 replayed trajectory = a group of K
        return rows_to_gen_batch(fresh + exp_rows, self.global_steps)

    def _replay_ready(self) -> bool:
        return self._active and len(self.store) > 0 and len(self.store) >= self.method_config.replay.min_buffer

    def _take_fresh(self, n: int) -> list[dict]:
        """``n`` dataloader prompts whose question is not retired (at most one epoch of fetches;
        if everything left is retired, retired prompts are used after all)."""
        out: list[dict] = []
        skipped: list[dict] = []
        fetches, limit = 0, max(1, len(self.train_dataloader))
        while len(out) < n:
            if not self._carry:
                if fetches >= limit:
                    logger.warning("exgrpo: every remaining question is retired; reusing retired prompts")
                    out += skipped[: n - len(out)]
                    break
                self._carry = gen_batch_rows(self._fetch_one_gen_batch())
                fetches += 1
            row = self._carry.pop(0)
            if self.store.is_retired(row_question(row)):
                skipped.append(row)
                self._skipped_retired += 1
            else:
                out.append(row)
        return out

    # -- 2. replay row ---------------------------------------------------------------------------------
    def plan_group_replay(self, groups: list[PromptGroup], metrics: dict) -> list[ReplayRowSpec]:
        cfg = self.method_config.select
        chosen_groups = [(g, self._experience[g.uid]) for g in groups if g.uid in self._experience]
        candidates: dict[str, list[PoolTrajectory]] = {}
        for g, q in chosen_groups:
            trajs = self.store.trajectories(q)
            if cfg.max_candidates:
                trajs = trajs[-cfg.max_candidates:]
            if trajs:
                candidates[g.uid] = trajs
        picks: dict[str, PoolTrajectory] = {}
        entropies: dict[str, float] = {}
        if cfg.trajectory == "min_entropy":
            items = [(uid, torch.from_numpy(t.response_ids)) for uid, ts in candidates.items() if len(ts) > 1 for t in ts]
            scores = iter(self.policy_entropy(items))
            for uid, ts in candidates.items():
                if len(ts) == 1:  # nothing to choose: no forward pass
                    picks[uid] = ts[0]
                    continue
                ent = [next(scores) for _ in ts]
                best = int(np.argmin(ent))
                picks[uid], entropies[uid] = ts[best], ent[best]
        elif cfg.trajectory == "random":
            for uid, ts in candidates.items():
                picks[uid] = ts[int(self._replay_rng.integers(len(ts)))]
        else:  # latest
            picks = {uid: ts[-1] for uid, ts in candidates.items()}

        max_len = int(self.config.data.max_response_length)
        specs = []
        for g, _ in chosen_groups:
            t = picks.get(g.uid)
            if t is None:
                continue
            n = min(t.num_tokens, max_len)
            specs.append(ReplayRowSpec(
                uid=g.uid, response_ids=torch.from_numpy(t.response_ids[:n].copy()), score=t.score,
                stored_log_probs=torch.from_numpy(t.logprobs[:n].copy()),
            ))
        p = self.metric_prefix
        metrics.update({
            f"{p}replay/experience_questions": float(len(chosen_groups)),
            f"{p}select/candidates_mean": float(np.mean([len(ts) for ts in candidates.values()])) if candidates else 0.0,
            f"{p}select/entropy_chosen": float(np.mean(list(entropies.values()))) if entropies else 0.0,
            f"{p}select/age_mean": float(np.mean([self.global_steps - t.step for t in picks.values()])) if picks else 0.0,
        })
        return specs

    # -- 4. pool ---------------------------------------------------------------------------------------
    def after_group_step(self, batch: KVBatchMeta, step: GroupStep, metrics: dict) -> None:
        cfg = self.method_config
        pid = batch.partition_id
        keys = [k for k, tag in zip(batch.keys, batch.tags) if not tag.get("is_padding", False)]
        lp_key = "old_log_probs"
        if cfg.pool.logprobs == "rollout" and self.config.actor_rollout_ref.rollout.calculate_log_probs:
            lp_key = "rollout_log_probs"
        data = tq.kv_batch_get(keys=keys, partition_id=pid, select_fields=["uid", "rm_scores", "responses", lp_key])
        replay = set(step.replay_keys)
        by_uid: dict[str, list[tuple[bool, float, torch.Tensor, torch.Tensor]]] = defaultdict(list)
        for key, uid, rm, resp, lp in zip(
            keys, td_column(data, "uid"), data["rm_scores"].unbind(0), data["responses"].unbind(0),
            data[lp_key].unbind(0), strict=True,
        ):
            by_uid[str(uid)].append((key in replay, float(rm.float().sum()), resp, lp))

        thr = cfg.pool.correct_threshold
        fresh_scores = [score for rows in by_uid.values() for is_replay, score, _, _ in rows if not is_replay]
        accuracy = float(np.mean([s > thr for s in fresh_scores])) if fresh_scores else 0.0
        self._last_accuracy = accuracy
        if not self._active and accuracy > cfg.start_accuracy:
            self._active = True
            logger.info(f"exgrpo: fresh-rollout accuracy {accuracy:.3f} > {cfg.start_accuracy}: experience "
                        "collection on from this step, replay from the next")

        outcomes: dict[str, int] = defaultdict(int)
        ks = []
        # The official code is purely on-policy until activation: nothing is stored (or retired)
        # before the first step whose fresh accuracy exceeds start_accuracy.
        self.store.begin_step()
        for uid, rows in by_uid.items():
            group = step.groups.get(uid)
            question, prompt_row = self._issued.get(uid, (group.question if group else None, None))
            k = sum(score > thr for _, score, _, _ in rows)
            ks.append(k)
            if not self._active:
                outcomes["before_activation"] += 1
                continue
            if question is None or (prompt_row is None and question not in self.store):
                outcomes["unknown_prompt"] += 1  # e.g. a prompt issued before a resume
                continue
            correct = [
                PoolTrajectory(resp.numpy(), lp.float().numpy(), score, self.global_steps)
                for is_replay, score, resp, lp in rows if not is_replay and score > thr
            ]
            outcome = self.store.update_group(
                question, num_correct=k, group_size=len(rows), correct=correct, prompt_row=prompt_row
            )
            outcomes[outcome] += 1
        for uid in step.groups:
            self._issued.pop(uid, None)
            self._experience.pop(uid, None)

        p = self.metric_prefix
        metrics.update(self.store_metrics())
        metrics.update({
            f"{p}active": float(self._active),
            f"{p}batch_accuracy": accuracy,
            f"{p}group_correct_mean": float(np.mean(ks)) if ks else 0.0,
            f"{p}pool/skipped_retired_prompts": float(self._skipped_retired),
            **{f"{p}pool/outcome_{name}": float(n) for name, n in outcomes.items()},
        })
        self._skipped_retired = 0
