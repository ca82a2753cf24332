"""Re-exports for ``benchmarks/bench_topk_kernel.py``: the top-k JS pieces now live in
:mod:`dyjr_verl.methods.dyjr.topk` (loss), :mod:`dyjr_verl.methods.dyjr.topk_jsd` (math) and
:mod:`dyjr_verl.diagnostics.topk_record` (the record)."""

from dyjr_verl.diagnostics.topk_record import (  # noqa: F401
    LOG_PROB_FLOOR,
    TopKRecord,
    build_topk_record,
    record_from_topk_logprobs,
    topk_buffer_bytes,
    topk_record_bytes_per_token,
)
from dyjr_verl.methods.dyjr.topk import *  # noqa: F401,F403
from dyjr_verl.methods.dyjr.topk_jsd import jsd_from_logprobs, topk_js_loss, topk_jsd, topk_jsd_from_hidden  # noqa: F401
