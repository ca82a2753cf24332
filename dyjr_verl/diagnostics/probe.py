"""Probe of the old-log-prob forward: Rank-k diagnostics and the stored top-k record.

verl's old-log-prob pass already materialises the policy's logits for every generated token of
the step (the weights that sampled them). Two things want exactly those logits, and neither is
worth a second forward:

* **Rank-k diagnostics** (every method, GRPO too): the mean probability of the Rank-1..k token and
  the entropy over the step's generated positions -- the paper's central analysis, per step;
* **the top-k record** a method may store with each trajectory (ids, log-probs and rest mass of the
  sampling-time distribution; DyJR's exact top-k JS estimator, :mod:`.topk_record`).

The trainer (:class:`dyjr_verl.diagnostics.trainer.ProbedSyncTrainer`) runs that pass with
``compute_loss=True``, ``distillation_use_topk=True`` and the non-tensor flags below. verl's FSDP
engine then calls the installed loss first as a logits processor (``student_logits=``), then as the
loss (``model_output=``). :func:`probed_loss` wraps the real loss: with a probe flag it answers both
calls itself (per-token record outputs, which verl writes to TransferQueue; Rank-k sums returned as
loss metrics, which verl hands back in the output meta's ``extra_info["metrics"]``); otherwise it
delegates unchanged, so the actor update is byte-for-byte the wrapped loss.

Only response positions are computed (``rows=``: the kernel reads them in place, no ``[M, V]``
copy of the selected logits), with the chunked kernel (:func:`dyjr_verl.kernels.topk_log_softmax`:
one streamed pass for top-r + entropy, no ``[N, V]`` fp32 copy). Sequence parallel: the sums are
this rank's slice (the record is gathered by verl).
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Optional

import torch

from dyjr_verl.diagnostics.topk_record import (
    RECORD_LOGP_DTYPE,
    TOPK_RECORD_FLAG,
    TOPK_RECORD_PREFIX,
    build_topk_record,
    non_tensor,
    response_positions,
)

__all__ = [
    "RANK_K_FLAG",
    "RANK_K_PREFIX",
    "probe_flags",
    "probe_logits",
    "probed_loss",
    "with_probe",
    "reduce_rank_k_metrics",
]

#: non-tensor micro-batch flag: int r > 0 -> Rank-1..r sums of the response positions
RANK_K_FLAG = "dyjr_rank_k"
#: prefix of the logged metrics (``rank_k/p1`` ..., ``rank_k/entropy``, ``rank_k/top{r}_mass``)
RANK_K_PREFIX = "rank_k/"
_SUM = "dyjr_probe/"  # prefix of the raw per-micro-batch sums returned as loss metrics

# Sums of the last processor call(s), consumed by the loss call of the same micro-batch: the engine
# calls processor then loss back to back in one process, and the processor can only return
# per-token tensors.
_PENDING: list[dict[str, float]] = []


def probe_flags(data) -> tuple[int, int]:
    """(rank_k, record_k) set on a micro-batch; (0, 0) when it is not a probe pass."""
    return int(non_tensor(data, RANK_K_FLAG, 0) or 0), int(non_tensor(data, TOPK_RECORD_FLAG, 0) or 0)


@torch.no_grad()
def probe_logits(student_logits: torch.Tensor, data, *, backend: str = "auto") -> dict[str, torch.Tensor]:
    """The logits-processor call of a probe pass. ``student_logits`` ``(1, nnz_local, V)`` as the
    engine passes them (temperature-scaled, packed rows). Returns the record's 2k+1 per-token
    outputs (``TOPK_RECORD_PREFIX`` + ``id{i}`` / ``logp{i}`` / ``log_rest``; zeros off the
    response) when the record flag is set; stashes the Rank-k sums for the loss call."""
    from dyjr_verl.kernels import topk_log_softmax

    rank_k, record_k = probe_flags(data)
    logits = student_logits.reshape(-1, student_logits.shape[-1])
    n_local, device = logits.shape[0], logits.device
    rows, _, _ = response_positions(data, n_local, device)
    outputs: dict[str, torch.Tensor] = {}
    if record_k > 0:
        # rows=: the kernel reads the response rows in place (no [M, V] copy); the outputs travel in
        # the stored record's dtypes (int32 ids, bf16 log-probs: 6k + 2 bytes per position)
        rec = build_topk_record(logits, record_k, rows=rows, dtype=RECORD_LOGP_DTYPE, backend=backend)
        ids = torch.zeros((n_local, record_k), dtype=torch.int32, device=device)
        logp = torch.zeros((n_local, record_k), dtype=RECORD_LOGP_DTYPE, device=device)
        rest = torch.zeros(n_local, dtype=RECORD_LOGP_DTYPE, device=device)
        ids[rows], logp[rows], rest[rows] = rec.ids, rec.logp, rec.log_rest
        outputs.update({f"{TOPK_RECORD_PREFIX}id{i}": ids[:, i][None] for i in range(record_k)})
        outputs.update({f"{TOPK_RECORD_PREFIX}logp{i}": logp[:, i][None] for i in range(record_k)})
        outputs[f"{TOPK_RECORD_PREFIX}log_rest"] = rest[None]
    if rank_k > 0:
        sums = {f"{_SUM}tokens": float(rows.numel())}
        if rows.numel():
            out = topk_log_softmax(logits, None, rows=rows, entropy=True, top_r=rank_k, backend=backend)
            top = out.top_probs.double().sum(dim=0)
            sums.update({f"{_SUM}p{i + 1}": float(top[i]) for i in range(top.shape[0])})
            sums[f"{_SUM}entropy"] = float(out.entropy.double().sum())
        _PENDING.append(sums)
    return outputs


def probed_loss(
    inner: Callable,
    model_output: Any = None,
    data: Any = None,
    dp_group: Any = None,
    *,
    student_logits: Optional[torch.Tensor] = None,
    backend: str = "auto",
    **kwargs: Any,
):
    """``set_loss_fn`` loss: probe passes are answered here, everything else goes to ``inner``."""
    if probe_flags(data) == (0, 0):
        if student_logits is not None:
            return inner(student_logits=student_logits, data=data, **kwargs)
        return inner(model_output=model_output, data=data, dp_group=dp_group, **kwargs)
    if student_logits is not None:
        return probe_logits(student_logits, data, backend=backend)
    metrics: dict[str, float] = {}
    while _PENDING:  # one entry per processor call of this micro-batch
        for key, value in _PENDING.pop().items():
            metrics[key] = metrics.get(key, 0.0) + value
    device = next((v.device for v in (model_output or {}).values() if isinstance(v, torch.Tensor)), torch.device("cpu"))
    return torch.zeros((), device=device), metrics


def with_probe(inner: Callable, *, backend: str = "auto") -> functools.partial:
    """Picklable wrapper of a loss (a ``partial`` itself) for ``actor_rollout_wg.set_loss_fn``."""
    return functools.partial(probed_loss, inner, backend=backend)


def _flat(value: Any) -> list[float]:
    if isinstance(value, (list, tuple)):
        return [x for v in value for x in _flat(v)]
    if hasattr(value, "value"):  # verl Metric
        return _flat(value.value)
    return [float(value)]


def reduce_rank_k_metrics(worker_metrics: dict[str, Any], *, prefix: str = RANK_K_PREFIX) -> dict[str, float]:
    """Driver side: the per-micro-batch (and per-dp-rank) sums a probe pass returned ->
    token-weighted ``{prefix}p1..p{r}``, ``{prefix}top{r}_mass``, ``{prefix}entropy``,
    ``{prefix}tokens``. Empty when the pass computed no Rank-k sums."""
    sums = {k[len(_SUM):]: sum(_flat(v)) for k, v in worker_metrics.items() if k.startswith(_SUM)}
    tokens = sums.pop("tokens", 0.0)
    if not sums and not tokens:
        return {}
    out: dict[str, float] = {}
    ranks = sorted(int(k[1:]) for k in sums if k.startswith("p"))
    n = max(tokens, 1.0)
    for r in ranks:
        out[f"{prefix}p{r}"] = sums[f"p{r}"] / n
    if ranks:
        out[f"{prefix}top{ranks[-1]}_mass"] = sum(out[f"{prefix}p{r}"] for r in ranks)
    if "entropy" in sums:
        out[f"{prefix}entropy"] = sums["entropy"] / n
    out[f"{prefix}tokens"] = float(tokens)
    return out
