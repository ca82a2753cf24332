"""Ex-GRPO's per-run experience logic, without verl: which prompts a step issues, which stored
trajectory joins each experience group, and how a finished step updates the pool.

:class:`Experience` holds the pool (:class:`.pool.ExperiencePool`), the settings, K, the RNG and the
bookkeeping between a step's prompts and its groups; the trainer (:mod:`.trainer`) calls it from
verl's stages and hands it a ``fetch`` of dataloader batches and a policy-entropy forward.
"""

from __future__ import annotations

import copy
import logging
import os
import uuid
from collections import defaultdict
from typing import Any, Callable, Iterable, Optional

import numpy as np
import torch
from tensordict import NonTensorData, TensorDict

from dyjr_verl.methods.exgrpo.config import ExGRPOConfig
from dyjr_verl.methods.exgrpo.pool import ExperiencePool, PoolTrajectory
from dyjr_verl.replay.group_rows import PromptGroup, ReplayRowSpec
from dyjr_verl.replay.questions import question_key

logger = logging.getLogger(__name__)
logger.setLevel(os.getenv("VERL_LOGGING_LEVEL", "INFO"))

__all__ = ["ROLLOUT_N_KEY", "gen_batch_rows", "rows_to_gen_batch", "row_question", "Experience"]

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
    from verl.utils import tensordict_utils as tu
    from verl.utils.dataset.rl_dataset import collate_fn

    batch = tu.get_tensordict(collate_fn(rows))
    tu.assign_non_tensor_data(batch, "global_steps", global_steps)
    return batch


def row_question(row: dict[str, Any]) -> str:
    return question_key(row.get("raw_prompt"), row.get("data_source"))


#: (key, is a replayed row, uid, score, response ids, recorded log-probs) of one finished row
FinishedRow = tuple[str, bool, str, float, torch.Tensor, torch.Tensor]


class Experience:
    """Ex-GRPO's state across steps (module docstring); ``prefix``: metric prefix."""

    def __init__(self, cfg: ExGRPOConfig, num_rollouts: int, pool: ExperiencePool, rng: np.random.Generator,
                 *, prefix: str = "exgrpo/"):
        self.cfg, self.K, self.pool, self.rng, self.prefix = cfg, int(num_rollouts), pool, rng, prefix
        self.active = False
        self.last_accuracy: Optional[float] = None
        self.issued: dict[str, tuple[str, dict]] = {}  # uid -> (question, prompt row) of issued prompts
        self.experience: dict[str, str] = {}  # uid -> question, experience prompts not trained on yet
        self.carry: list[dict] = []  # dataloader rows fetched while skipping retired ones, used next
        self.skipped_retired = 0

    def state(self) -> dict[str, Any]:
        return {"active": self.active, "last_accuracy": self.last_accuracy}

    def load_state(self, state: dict[str, Any]) -> None:
        self.active = bool(state.get("active", False))
        self.last_accuracy = state.get("last_accuracy")

    # -- 1. prompts ----------------------------------------------------------------------------------
    def replay_ready(self) -> bool:
        return self.active and len(self.pool) > 0 and len(self.pool) >= self.cfg.replay.min_buffer

    def next_prompts(self, wanted: int, *, refill: bool, fetch: Callable[[], TensorDict], max_fetches: int,
                     global_steps: int) -> TensorDict:
        """The step's prompts: experience questions (once replay is on; never in a ``refill`` of
        failed groups: the batch's mix is set once) + fresh dataloader prompts that are not retired.
        The dataloader is read only for the fresh part, so rho of the batch comes from the pool as in
        Ex-GRPO (rows fetched but not used wait in ``carry``)."""
        n_exp = min(self.cfg.num_experience_questions(wanted), len(self.pool)) if not refill and self.replay_ready() else 0
        exp_rows = []
        for q in self.pool.sample_questions(n_exp, self.rng) if n_exp else []:
            row = copy.deepcopy(self.pool.prompt_row(q))
            row["uid"] = str(uuid.uuid4())
            exp_rows.append(row)
            self.experience[row["uid"]] = q
        fresh = self.take_fresh(wanted - len(exp_rows), fetch, max_fetches)
        for row in fresh + exp_rows:
            prompt = {k: v for k, v in row.items() if k not in _NOT_PROMPT_FIELDS}
            self.issued[row["uid"]] = (self.experience.get(row["uid"]) or row_question(row), prompt)
        if exp_rows:
            for row in fresh:
                row[ROLLOUT_N_KEY] = self.K
            for row in exp_rows:
                row[ROLLOUT_N_KEY] = self.K - 1  # + 1 replayed trajectory = a group of K
        return rows_to_gen_batch(fresh + exp_rows, global_steps)

    def take_fresh(self, n: int, fetch: Callable[[], TensorDict], max_fetches: int) -> list[dict]:
        """``n`` dataloader prompts whose question is not retired (at most ``max_fetches`` fetches;
        if everything left is retired, retired prompts are used after all)."""
        out: list[dict] = []
        skipped: list[dict] = []
        fetches, limit = 0, max(1, max_fetches)
        while len(out) < n:
            if not self.carry:
                if fetches >= limit:
                    logger.warning("exgrpo: every remaining question is retired; reusing retired prompts")
                    out += skipped[: n - len(out)]
                    break
                self.carry = gen_batch_rows(fetch())
                fetches += 1
            row = self.carry.pop(0)
            if self.pool.is_retired(row_question(row)):
                skipped.append(row)
                self.skipped_retired += 1
            else:
                out.append(row)
        return out

    # -- 2. the replayed row ----------------------------------------------------------------------------
    def choose_rows(self, groups: list[PromptGroup], entropy: Callable[[list], list[float]], *, max_len: int,
                    step: int, metrics: dict) -> list[ReplayRowSpec]:
        """The replayed row of each experience group: its stored trajectory by ``select.trajectory``
        (``min_entropy``: one batched ``entropy`` forward over the candidates of questions with more
        than one), cut to ``max_len`` tokens, with its stored score and recorded log-probs."""
        cfg = self.cfg.select
        chosen_groups = [(g, self.experience[g.uid]) for g in groups if g.uid in self.experience]
        candidates: dict[str, list[PoolTrajectory]] = {}
        for g, q in chosen_groups:
            trajs = self.pool.trajectories(q)
            if cfg.max_candidates:
                trajs = trajs[-cfg.max_candidates:]
            if trajs:
                candidates[g.uid] = trajs
        picks: dict[str, PoolTrajectory] = {}
        entropies: dict[str, float] = {}
        if cfg.trajectory == "min_entropy":
            items = [(uid, torch.from_numpy(t.response_ids)) for uid, ts in candidates.items() if len(ts) > 1 for t in ts]
            scores = iter(entropy(items))
            for uid, ts in candidates.items():
                if len(ts) == 1:  # nothing to choose: no forward pass
                    picks[uid] = ts[0]
                    continue
                ent = [next(scores) for _ in ts]
                best = int(np.argmin(ent))
                picks[uid], entropies[uid] = ts[best], ent[best]
        elif cfg.trajectory == "random":
            for uid, ts in candidates.items():
                picks[uid] = ts[int(self.rng.integers(len(ts)))]
        else:  # latest
            picks = {uid: ts[-1] for uid, ts in candidates.items()}

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
        p = self.prefix
        metrics.update({
            f"{p}replay/experience_questions": float(len(chosen_groups)),
            f"{p}select/candidates_mean": float(np.mean([len(ts) for ts in candidates.values()])) if candidates else 0.0,
            f"{p}select/entropy_chosen": float(np.mean(list(entropies.values()))) if entropies else 0.0,
            f"{p}select/age_mean": float(np.mean([step - t.step for t in picks.values()])) if picks else 0.0,
        })
        return specs

    # -- 4. the pool ------------------------------------------------------------------------------------
    def update_pool(self, groups: dict[str, PromptGroup], rows: Iterable[FinishedRow], *, step: int, metrics: dict) -> None:
        """Apply a finished step: fresh accuracy (activation), then per group retire / store / ignore
        (:meth:`ExperiencePool.update_group`); verl's and our padding rows are not in ``rows``."""
        cfg = self.cfg
        by_uid: dict[str, list[tuple[bool, float, torch.Tensor, torch.Tensor]]] = defaultdict(list)
        for _key, is_replay, uid, score, resp, lp in rows:
            by_uid[str(uid)].append((is_replay, float(score), resp, lp))

        thr = cfg.pool.correct_threshold
        fresh_scores = [score for group_rows in by_uid.values() for is_replay, score, _, _ in group_rows if not is_replay]
        accuracy = float(np.mean([s > thr for s in fresh_scores])) if fresh_scores else 0.0
        self.last_accuracy = accuracy
        if not self.active and accuracy > cfg.start_accuracy:
            self.active = True
            logger.info(f"exgrpo: fresh-rollout accuracy {accuracy:.3f} > {cfg.start_accuracy}: experience "
                        "collection on from this step, replay from the next")

        outcomes: dict[str, int] = defaultdict(int)
        ks = []
        # The official code is purely on-policy until activation: nothing is stored (or retired)
        # before the first step whose fresh accuracy exceeds start_accuracy.
        self.pool.begin_step()
        for uid, group_rows in by_uid.items():
            group = groups.get(uid)
            question, prompt_row = self.issued.get(uid, (group.question if group else None, None))
            k = sum(score > thr for _, score, _, _ in group_rows)
            ks.append(k)
            if not self.active:
                outcomes["before_activation"] += 1
                continue
            if question is None or (prompt_row is None and question not in self.pool):
                outcomes["unknown_prompt"] += 1  # e.g. a prompt issued before a resume
                continue
            correct = [
                PoolTrajectory(resp.numpy(), lp.float().numpy(), score, step)
                for is_replay, score, resp, lp in group_rows if not is_replay and score > thr
            ]
            outcome = self.pool.update_group(
                question, num_correct=k, group_size=len(group_rows), correct=correct, prompt_row=prompt_row
            )
            outcomes[outcome] += 1
        for uid in groups:
            self.issued.pop(uid, None)
            self.experience.pop(uid, None)

        p = self.prefix
        metrics.update(self.pool.metrics(prefix=f"{p}pool/"))
        metrics.update({
            f"{p}active": float(self.active),
            f"{p}batch_accuracy": accuracy,
            f"{p}group_correct_mean": float(np.mean(ks)) if ks else 0.0,
            f"{p}pool/skipped_retired_prompts": float(self.skipped_retired),
            **{f"{p}pool/outcome_{name}": float(n) for name, n in outcomes.items()},
        })
        self.skipped_retired = 0
