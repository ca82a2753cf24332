"""Strategy 2's rows: replayed trajectories inside their prompt's GRPO group (pure pieces).

The per-step state (:class:`GroupStep`), the rows a method asks for (:class:`ReplayRowSpec`), a
replayed row on its group's template (:func:`make_replay_row`, the codec's
:func:`~dyjr_verl.replay.codec.build_row` with the group's prompt), the reward-worker input of a
row (:func:`reward_input`) and reading a step's groups from TransferQueue (:func:`read_groups`).
The trainer that uses them is :mod:`.group_strategy`.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np
import torch
from tensordict import TensorDict

from dyjr_verl.replay.codec import build_row, replay_tag, rows_to_td, td_column, write_rows
from dyjr_verl.replay.questions import question_key

__all__ = ["PromptGroup", "ReplayRowSpec", "GroupStep", "make_replay_row", "reward_input", "read_groups", "write_group_rows",
           "remove_group_rows"]


@dataclass
class PromptGroup:
    """One prompt's fresh rollouts in this step's batch."""

    uid: str
    keys: list[str]
    question: str  # dyjr_verl.replay.questions.question_key of the prompt
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
    #: this step's rows as the update read them (uid, masks, log-probs, rewards, responses), shared
    #: by the loss fields and the method's after-step hook (one TransferQueue read, not two)
    data: Optional[TensorDict] = None
    data_keys: list[str] = field(default_factory=list)  # the rows of ``data``, in order
    data_tags: list[dict] = field(default_factory=list)


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
    row = build_row(template, response_ids, score=score, rollout_log_probs=rollout_log_probs)
    if "session_id" in template:
        row["session_id"] = session_id
    return row, replay_tag(tag, int(row["prompts"].numel()), int(row["responses"].numel()))


def _object_column(value: Any) -> np.ndarray:
    arr = np.empty(1, dtype=object)
    arr[0] = value
    return arr


def reward_input(row: dict) -> Any:
    """One row as the reward-loop worker's ``compute_score`` receives it from verl's agent loop."""
    from verl.protocol import DataProto

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


def read_groups(client: Any, batch: Any) -> GroupStep:
    """This step's GRPO groups (uid -> keys, question) from one TransferQueue read."""
    pid = batch.partition_id
    info = client.kv_batch_get(keys=batch.keys, partition_id=pid, select_fields=["uid", "raw_prompt", "data_source"])
    groups: dict[str, PromptGroup] = {}
    for key, uid, raw_prompt, source in zip(
        batch.keys, td_column(info, "uid"), td_column(info, "raw_prompt"), td_column(info, "data_source"), strict=True
    ):
        uid = str(uid)
        if uid not in groups:
            groups[uid] = PromptGroup(uid, [], question_key(raw_prompt, source), raw_prompt, source)
        groups[uid].keys.append(key)
    return GroupStep(partition_id=pid, groups=groups, tags=dict(zip(batch.keys, batch.tags)), fresh_rows=len(batch))


def write_group_rows(client: Any, step: GroupStep, rows: list[dict], tags: list[dict], pad_rows: list[dict],
                     pad_tags: list[dict], *, like: TensorDict, prefix: str) -> None:
    """Put the step's replayed and padding rows under fresh keys (recorded in ``step``); they stay
    until :func:`remove_group_rows` at the end of the step."""
    keys, _ = write_rows(client, step.partition_id, rows_to_td(rows + pad_rows, like), tags + pad_tags, prefix=prefix)
    step.replay_keys, step.padding_keys = keys[: len(rows)], keys[len(rows):]


def remove_group_rows(client: Any, batch: Any, step: GroupStep) -> Any:
    """After the step: our replayed and padding rows leave TransferQueue and the batch, so verl's
    metrics, sample counts and end-of-step clear see fresh rows only."""
    ours = step.replay_keys + step.padding_keys
    if not ours:
        return batch
    client.kv_clear(keys=ours, partition_id=batch.partition_id)
    gone = set(ours)
    return batch.select_keys([k for k in batch.keys if k not in gone])
