"""Kernels: chunked log-softmax statistics at given ids (top-k JS, Rank-k diagnostics).

:func:`topk_log_softmax` (logits) and :func:`topk_log_softmax_from_hidden` (hidden states x LM head)
return logsumexp, the log-probs of k given ids, the log rest mass, optionally the entropy and the
top-r probabilities, with a custom chunked backward (no saved ``[N, V]`` fp32 tensor). Torch backend
everywhere; Triton backend for CUDA logits (unverified on GPU, see ``docs/topk.md``).
"""

from dyjr_verl.kernels.topk_logsoftmax import (
    LOG_REST_FLOOR,
    TopKLogSoftmaxOutput,
    default_block_elems,
    topk_log_softmax,
    topk_log_softmax_from_hidden,
    triton_available,
)

__all__ = [
    "LOG_REST_FLOOR",
    "TopKLogSoftmaxOutput",
    "default_block_elems",
    "topk_log_softmax",
    "topk_log_softmax_from_hidden",
    "triton_available",
]
