"""RLEP (Experience rePlay, arXiv 2507.07451) as a verl 0.9.1 trainer mode: ``trainer.v1.trainer_mode=rlep``.

Phase 1 (offline, :mod:`.collect`) samples N answers per training question
from a trained checkpoint, verifies them and keeps questions with >= 2 correct answers as the
experience pool. Phase 2 (this trainer, restarted from the *base* model) appends, to every group of
G fresh rollouts, up to M (default 2) stored successes of the same question, so GRPO's advantage is
computed over the G + M rows (paper Eq. 5). The replayed answers are

* re-tokenised (+ EOS, as the official data loader) and truncated to ``data.max_response_length``;
* re-scored by verl's reward workers (RLEP's DAPO reward manager scores all G + M rows);
* ordinary rows for the loss: their old log-probs are recomputed by the current policy, so the
  ratio starts at 1 and there is no importance correction to the collecting policy (official code).

Deliberate difference: a question with fewer than M stored answers gets only those (none if it is
not in the pool). The official loader pads such questions with empty answers that are scored as
failures and join the group; that quirk is not reproduced (docs/baselines.md).

Mini-batches keep ``ppo_mini_batch_size x G`` rows as in the official code, so the replayed rows
add optimizer steps (512 x 18 rows: 9 steps where GRPO takes 8). Everything else — where rows enter
the step, TransferQueue keys, scoring, padding — is the replay core's
:class:`~dyjr_verl.replay.group_strategy.GroupReplayTrainer`.
"""

from __future__ import annotations

import verl.trainer.ppo.v1  # noqa: F401, I001  (first: see dyjr_verl/plugin.py)
import logging
import os
from typing import Any

import numpy as np
import torch
from verl.trainer.ppo.v1.trainer_base import register_trainer

from dyjr_verl import plugin
from dyjr_verl.methods.rlep.config import RLEPConfig
from dyjr_verl.methods.rlep.pool import RLEPPool
from dyjr_verl.replay.group_rows import PromptGroup, ReplayRowSpec
from dyjr_verl.replay.group_strategy import GroupReplayTrainer

logger = logging.getLogger(__name__)
logger.setLevel(os.getenv("VERL_LOGGING_LEVEL", "INFO"))


def tokenize_answer(tokenizer: Any, text: str, *, max_tokens: int, append_eos: bool = True) -> torch.Tensor:
    """A stored answer string as response token ids (EOS appended, then cut to ``max_tokens``).

    An answer longer than the response budget loses its tail (and EOS), like a truncated rollout.
    """
    ids = list(tokenizer.encode(text, add_special_tokens=False))
    if append_eos and tokenizer.eos_token_id is not None:
        ids.append(int(tokenizer.eos_token_id))
    ids = ids[: max(1, int(max_tokens))]
    if not ids:  # an empty answer without EOS: nothing to replay
        return torch.zeros(0, dtype=torch.int64)
    return torch.tensor(ids, dtype=torch.int64)


def load_pool(cfg: RLEPConfig) -> RLEPPool:
    """The experience pool of ``rlep.pool_path`` (empty when RLEP is off)."""
    if not cfg.enable:
        return RLEPPool({}, min_correct=cfg.min_correct)
    pool = RLEPPool.load(os.path.expanduser(cfg.pool_path), min_correct=cfg.min_correct)
    logger.info(f"rlep: experience pool {cfg.pool_path}: {len(pool)} questions, {pool.num_candidates} answers "
                f"({pool.dropped} questions below min_correct={cfg.min_correct} ignored)")
    return pool


def plan_rows(groups: list[PromptGroup], pool: RLEPPool, cfg: RLEPConfig, tokenizer: Any, *, max_tokens: int,
              rng: np.random.Generator, prefix: str = "rlep/") -> tuple[list[ReplayRowSpec], dict[str, float]]:
    """Up to ``replay_per_group`` stored answers of each group's question, re-tokenised; re-scored
    by verl's reward workers (``rescore``) or trusted (score 1.0); on-policy rows (no stored log-probs)."""
    specs: list[ReplayRowSpec] = []
    missing = short = 0
    for group in groups:
        answers = pool.draw(group.question, cfg.replay_per_group, rng)
        if not answers:
            missing += 1
            continue
        if len(answers) < cfg.replay_per_group:
            short += 1
        for text in answers:
            ids = tokenize_answer(tokenizer, text, max_tokens=max_tokens, append_eos=cfg.append_eos)
            if ids.numel():
                specs.append(ReplayRowSpec(uid=group.uid, response_ids=ids, score=None if cfg.rescore else 1.0))
    return specs, {f"{prefix}replay/questions_not_in_pool": float(missing), f"{prefix}replay/questions_short": float(short)}


@register_trainer("rlep")
class RLEPTrainer(GroupReplayTrainer):
    """RLEP replay: M stored successes per group, re-scored, on-policy rows (``rlep:`` node)."""

    config_node = "rlep"
    config_class = RLEPConfig
    metric_prefix = "rlep/"
    # official code: the G + M rows go through mini-batches of ppo_mini_batch_size x G rows, so
    # 512 x 18 rows take 9 optimizer steps where GRPO takes 8 (docs/baselines.md)
    keeps_minibatch_rows = True

    def build_store(self) -> RLEPPool:
        return load_pool(self.method_config)

    def loss_spec(self) -> None:
        return None  # replayed rows are ordinary rows for verl's own loss

    def store_metrics(self) -> dict[str, float]:
        return self.store.metrics(prefix=f"{self.metric_prefix}pool/")

    def store_digest(self, state: dict) -> str:
        return str(state.get("fingerprint", ""))

    # -- group replay hooks ------------------------------------------------------------------------
    def plan_group_replay(self, groups: list[PromptGroup], metrics: dict) -> list[ReplayRowSpec]:
        specs, plan_metrics = plan_rows(groups, self.store, self.method_config, self.tokenizer,
                                        max_tokens=int(self.config.data.max_response_length), rng=self._replay_rng,
                                        prefix=self.metric_prefix)
        metrics.update(plan_metrics)
        return specs

    def after_group_step(self, batch, step, metrics: dict) -> None:
        metrics.update(self.store_metrics())


plugin.register_pending(__name__)  # last: see dyjr_verl/plugin.py
