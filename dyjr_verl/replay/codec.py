"""The one TensorDict <-> rows codec of the replay core, and temporary rows in TransferQueue.

A row is a ``dict`` field -> value (tensors unbound from a TransferQueue batch, non-tensors as
objects). :func:`build_row` makes a row of verl's v1 layout for a given prompt and response from a
*template* row (one real row of the step, which fixes the field set and dtypes): it rebuilds the
token fields (``input_ids`` = prompt + response, ``attention_mask``, ``position_ids`` = arange,
``response_mask``, ``loss_mask``), puts the score on the last token of ``rm_scores``, takes the
per-token fields the caller gives, copies the template's token-independent tensors
(:data:`COPIED_TENSOR_FIELDS`) and refuses any other tensor field of the template (its meaning for a
new response is unknown: e.g. MoE routing replay, multi-modal position ids).

TransferQueue access goes through a *client* with verl's ``transfer_queue`` module functions
(``kv_batch_get(keys, partition_id, select_fields=None)``, ``kv_batch_put(keys, partition_id,
fields, tags=None)``, ``kv_clear(keys, partition_id)``), so the strategies run against an
in-memory stand-in in tests. Rows the core writes get keys ``<prefix><hex>_<j>_0``: a fresh prefix
before the first ``_`` (verl's replay buffer groups keys by it), never a prompt uid.
"""

from __future__ import annotations

import contextlib
import copy
import uuid
from typing import Any, Iterator, Mapping, Optional, Sequence

import torch
from tensordict import NonTensorStack, TensorDict

__all__ = [
    "REBUILT_FIELDS",
    "COPIED_TENSOR_FIELDS",
    "td_to_rows",
    "rows_to_td",
    "td_column",
    "nested",
    "build_row",
    "replay_tag",
    "padding_rows",
    "fresh_keys",
    "write_rows",
    "temporary_rows",
]

#: tensor fields :func:`build_row` rebuilds for a new prompt + response
REBUILT_FIELDS = (
    "prompts", "responses", "response_mask", "loss_mask", "input_ids", "position_ids",
    "attention_mask", "rm_scores", "rollout_log_probs",
)
#: tensor fields that do not depend on the row's tokens: copied from the template
COPIED_TENSOR_FIELDS = ("dummy_tensor",)


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


def rows_to_td(rows: Sequence[Mapping[str, Any]], like: Mapping[str, Any]) -> TensorDict:
    """Rows -> TensorDict with exactly ``like``'s fields and layouts (jagged stays jagged even when
    every row happens to have the same length). ``like``: a TensorDict, or a row whose tensors give
    each field's dtype (1-D and longer: jagged; scalars: dense)."""
    out: dict[str, Any] = {}
    for key in like.keys():
        ref = like.get(key) if isinstance(like, TensorDict) else like[key]
        values = [row[key] for row in rows]
        if isinstance(ref, torch.Tensor):
            jagged = ref.is_nested if isinstance(like, TensorDict) else ref.dim() >= 1 and key not in COPIED_TENSOR_FIELDS
            cast = [torch.as_tensor(v).to(ref.dtype).contiguous() for v in values]
            out[key] = torch.nested.as_nested_tensor(cast, layout=torch.jagged) if jagged else torch.stack(cast)
        else:
            out[key] = NonTensorStack(*values)
    return TensorDict(out, batch_size=[len(rows)])


def td_column(td: TensorDict, key: str) -> list:
    """A non-tensor column of a TransferQueue read as a python list (NonTensorStack, LinkedList, ...)."""
    value = td.get(key)
    if hasattr(value, "tolist"):
        value = value.tolist()
    return list(value)


def nested(rows: Sequence[torch.Tensor], dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """Jagged nested tensor of 1-D rows (``as_nested_tensor``: correct padded widths downstream)."""
    return torch.nested.as_nested_tensor(
        [(r if dtype is None else r.to(dtype)).contiguous() for r in rows], layout=torch.jagged
    )


def build_row(
    template: Mapping[str, Any],
    response_ids: Any,
    *,
    prompt_ids: Any = None,
    response_mask: Any = None,
    score: float = 0.0,
    rollout_log_probs: Optional[torch.Tensor] = None,
    per_token: Optional[Mapping[str, torch.Tensor]] = None,
    keep_non_tensor: bool = True,
) -> dict[str, Any]:
    """A row of the template's layout for ``prompt_ids`` (default: the template's prompt) and
    ``response_ids``.

    response_mask: default all ones. score: on the last token of ``rm_scores``.
    rollout_log_probs: the response's recorded log-probs (zeros when not given).
    per_token: values of the template's other response-length tensor fields (e.g.
        ``old_log_probs``, ``advantages``); cast to the template's dtype.
    keep_non_tensor: copy the template's non-tensor fields (same prompt: its group, ``uid``,
        question, ...); False drops them (a row of another prompt must not claim them).
    """
    response = torch.as_tensor(response_ids, dtype=torch.int64).reshape(-1).clone()
    length = int(response.numel())
    if length < 1:
        raise ValueError("a replayed response needs at least one token")
    per_token = dict(per_token or {})
    t_prompt = torch.as_tensor(template["prompts"])
    prompts = t_prompt if prompt_ids is None else torch.as_tensor(prompt_ids).reshape(-1)
    p_len, t_seq = int(prompts.numel()), int(t_prompt.numel()) + int(torch.as_tensor(template["responses"]).numel())
    unknown = [k for k, v in template.items() if isinstance(v, torch.Tensor)
               and k not in REBUILT_FIELDS and k not in COPIED_TENSOR_FIELDS and k not in per_token]
    if unknown:
        raise NotImplementedError(
            f"cannot replay a row with the field(s) {unknown}: a replayed row rebuilds only "
            f"{', '.join(REBUILT_FIELDS)}, copies {', '.join(COPIED_TENSOR_FIELDS)} and takes what its method gives"
        )
    if "position_ids" in template:
        pos = torch.as_tensor(template["position_ids"])
        if pos.dim() != 1 or not torch.equal(pos, torch.arange(t_seq, dtype=pos.dtype)):
            raise NotImplementedError("replay supports text rows with position_ids = arange(seq_len) only")

    def like(key: str) -> torch.dtype:
        return torch.as_tensor(template[key]).dtype

    row: dict[str, Any] = {}
    if keep_non_tensor:
        row.update({k: v for k, v in template.items() if not isinstance(v, torch.Tensor)})
        if isinstance(template.get("extra_fields"), dict):
            row["extra_fields"] = {**copy.deepcopy(template["extra_fields"]), "reward_extra_info": {}}
    row.update({k: template[k] for k in COPIED_TENSOR_FIELDS if k in template})
    mask = torch.ones(length) if response_mask is None else torch.as_tensor(response_mask).reshape(-1)
    if mask.numel() != length:
        raise ValueError(f"response_mask has {mask.numel()} entries for a {length}-token response")
    row["prompts"] = prompts.to(like("prompts")).clone()
    row["responses"] = response.to(like("responses"))
    row["response_mask"] = mask.to(like("response_mask")).clone()
    row["input_ids"] = torch.cat([prompts.to(torch.int64), response]).to(like("input_ids"))
    if "loss_mask" in template:  # full-sequence or response-length, as the template's
        lm = torch.as_tensor(template["loss_mask"])
        full = lm.numel() == t_seq and t_seq != int(torch.as_tensor(template["responses"]).numel())
        row["loss_mask"] = (torch.cat([torch.zeros(p_len), mask.float()]) if full else mask.float()).to(lm.dtype)
    if "attention_mask" in template:
        row["attention_mask"] = torch.ones(p_len + length, dtype=like("attention_mask"))
    if "position_ids" in template:
        row["position_ids"] = torch.arange(p_len + length, dtype=like("position_ids"))
    if "rm_scores" in template:
        rm = torch.zeros(length, dtype=like("rm_scores"))
        rm[-1] = float(score)
        row["rm_scores"] = rm
    if "rollout_log_probs" in template:
        lp = torch.zeros(length) if rollout_log_probs is None else torch.as_tensor(rollout_log_probs).reshape(-1)
        if lp.numel() != length:
            raise ValueError(f"rollout_log_probs has {lp.numel()} entries for a {length}-token response")
        row["rollout_log_probs"] = lp.to(like("rollout_log_probs"))
    for key, value in per_token.items():
        value = torch.as_tensor(value).reshape(-1)
        if value.numel() != length:
            raise ValueError(f"{key} has {value.numel()} entries for a {length}-token response")
        row[key] = value.to(like(key)) if key in template else value
    return row


def replay_tag(tag: Mapping[str, Any], prompt_len: int, response_len: int, *, padding: bool = False) -> dict[str, Any]:
    """A replayed (or padding) row's TransferQueue tag: the template's with the new lengths."""
    return {
        **copy.deepcopy(dict(tag)), "status": "success", "prompt_len": prompt_len, "response_len": response_len,
        "seq_len": prompt_len + response_len, "is_replay": not padding, "is_padding": padding,
    }


def padding_rows(template: dict[str, Any], tag: dict[str, Any], n: int, *, eos_token_id: Optional[int]) -> tuple[list[dict], list[dict]]:
    """``n`` no-op rows on the template's prompt: one EOS response token with a zero response
    mask and reward, in their own group (a fresh ``uid``), tagged ``is_padding`` like verl's own
    padding rows, so losses, advantages and metrics ignore them."""
    if n <= 0:
        return [], []
    uid = f"pad{uuid.uuid4().hex}"
    eos = 0 if eos_token_id is None else int(eos_token_id)
    p_len = int(torch.as_tensor(template["prompts"]).numel())
    rows, tags = [], []
    for i in range(n):
        row = build_row(template, [eos], response_mask=[0], score=0.0)
        row["uid"] = uid
        if "session_id" in template:
            row["session_id"] = i
        rows.append(row)
        tags.append(replay_tag(tag, p_len, 1, padding=True))
    return rows, tags


def fresh_keys(prefix: str, n: int) -> list[str]:
    """``n`` TransferQueue keys under a fresh prefix (module docstring)."""
    head = f"{prefix}{uuid.uuid4().hex[:12]}"
    return [f"{head}_{j}_0" for j in range(n)]


def write_rows(client: Any, partition_id: str, fields: TensorDict, tags: Sequence[dict], *, prefix: str) -> tuple[list[str], Any]:
    """Put rows under fresh keys; returns (keys, the put's meta)."""
    keys = fresh_keys(prefix, int(fields.batch_size[0]))
    meta = client.kv_batch_put(keys=keys, partition_id=partition_id, fields=fields, tags=list(tags))
    return keys, meta


@contextlib.contextmanager
def temporary_rows(client: Any, partition_id: str, fields: TensorDict, tags: Sequence[dict], *, prefix: str) -> Iterator[list[str]]:
    """Rows that live in TransferQueue for the ``with`` block only: written under fresh keys, the
    keys yielded, and always cleared (also when the block raises)."""
    keys, _ = write_rows(client, partition_id, fields, tags, prefix=prefix)
    try:
        yield keys
    finally:
        client.kv_clear(keys=keys, partition_id=partition_id)
