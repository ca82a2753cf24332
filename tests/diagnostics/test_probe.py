"""The old-log-prob probe (dyjr_verl/losses/probe.py): Rank-k sums and the top-k record from the
engine's logits-processor call, delegation to the wrapped loss everywhere else."""

from __future__ import annotations

import pickle

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from test_topk import PackedPolicy, actor_config, engine_step, make_batch
from verl.utils import tensordict_utils as tu

import dyjr_verl.diagnostics.topk_record as R
from dyjr_verl.analysis.rank_k import rank_k_metrics
from dyjr_verl.diagnostics.probe import RANK_K_FLAG, probe_flags, reduce_rank_k_metrics, with_probe
from dyjr_verl.methods.dyjr.topk import TOPK_IDS_KEY, TOPK_LOG_REST_KEY, TOPK_LOGP_KEY, make_topk_js_replay_loss_fn


def _response_mask_packed(td) -> torch.Tensor:
    """(nnz,) bool: packed positions that score a response token with response_mask set."""
    parts = []
    for p, r, m in zip(td["prompts"].unbind(), td["responses"].unbind(), td["response_mask"].unbind()):
        sel = torch.zeros(len(p) + len(r), dtype=torch.bool)
        sel[len(p) - 1 : len(p) - 1 + len(r)] = m.bool()
        parts.append(sel)
    return torch.cat(parts)


def _probe_call(fn, td, logits):
    out = fn(student_logits=logits[None], data=td)
    cu = td["input_ids"].offsets()
    mo = {k: torch.nested.nested_tensor_from_jagged(v.squeeze(0), cu) for k, v in out.items()}
    loss, metrics = fn(model_output=mo, data=td, dp_group=None)
    return out, mo, loss, metrics


def test_rank_k_sums_equal_the_reference_on_response_positions():
    policy = PackedPolicy(3)
    td, _ = make_batch(policy)
    fn = with_probe(make_topk_js_replay_loss_fn(actor_config()))
    tu.assign_non_tensor(td, **{RANK_K_FLAG: 5})
    assert probe_flags(td) == (5, 0)
    with torch.no_grad():
        logits = policy.logits(td)
        out, _, loss, metrics = _probe_call(fn, td, logits)
    assert out == {} and float(loss) == 0.0
    got = reduce_rank_k_metrics({k: [v] for k, v in metrics.items()})
    want = rank_k_metrics(logits, _response_mask_packed(td), k=5)
    assert got.keys() == want.keys()
    for key in want:
        assert abs(got[key] - want[key]) < 1e-9, key
    assert got["rank_k/p1"] >= got["rank_k/p2"] >= got["rank_k/p5"] > 0


def test_rank_k_reduction_is_token_weighted_over_micro_batches_and_ranks():
    a = {"dyjr_probe/tokens": 2.0, "dyjr_probe/p1": 1.8, "dyjr_probe/entropy": 0.4}
    b = {"dyjr_probe/tokens": 6.0, "dyjr_probe/p1": 3.0, "dyjr_probe/entropy": 3.6}
    got = reduce_rank_k_metrics({k: [[a[k]], [b[k]]] for k in a})  # [dp rank][micro-batch]
    assert got == {"rank_k/p1": 4.8 / 8, "rank_k/top1_mass": 4.8 / 8, "rank_k/entropy": 0.5, "rank_k/tokens": 8.0}
    assert reduce_rank_k_metrics({"loss": [1.0]}) == {}


def test_record_pass_builds_the_response_aligned_record():
    """Forward with the record flag (verl's old-log-prob pass): the processor emits the top-k record
    of the response positions, the loss is skipped, and the driver helper rebuilds what
    build_topk_record gives there."""
    policy_q = PackedPolicy(1)
    td, _ = make_batch(policy_q, k=4)
    fn = with_probe(make_topk_js_replay_loss_fn(actor_config()))
    tu.assign_non_tensor(td, **{R.TOPK_RECORD_FLAG: 4})
    with torch.no_grad():
        logits = policy_q.logits(td)
        out, mo, loss, metrics = _probe_call(fn, td, logits)
    assert len(out) == 9 and all(v.shape == (1, logits.shape[0]) for v in out.values())
    assert float(loss) == 0.0 and metrics == {}
    rec = R.record_from_model_output(mo, td, 4)
    assert rec.ids.dtype == torch.int32 and rec.ids.shape == td[TOPK_IDS_KEY].shape
    for b, m in enumerate(td["response_mask"].unbind()):
        keep = m.bool()
        n = len(m)
        assert torch.equal(rec.ids[b, :n][keep], td[TOPK_IDS_KEY][b, :n][keep])
        torch.testing.assert_close(rec.logp[b, :n][keep], td[TOPK_LOGP_KEY][b, :n][keep])
        torch.testing.assert_close(rec.log_rest[b, :n][keep], td[TOPK_LOG_REST_KEY][b, :n][keep])
        assert not rec.logp[b, :n][~keep].any()  # masked tokens: not computed
    try:
        R.record_from_model_output(mo, td, 5)
    except KeyError as e:
        assert R.TOPK_RECORD_FLAG in str(e)
    else:
        raise AssertionError("a record of the wrong k must not be rebuilt silently")


def test_without_flags_the_wrapped_loss_is_unchanged():
    """The actor update through the probe wrapper = the wrapped loss (values, gradients, metrics)."""
    policy, policy_q = PackedPolicy(0), PackedPolicy(1)
    inner = make_topk_js_replay_loss_fn(actor_config())
    wrapped = pickle.loads(pickle.dumps(with_probe(inner)))  # set_loss_fn ships it to workers
    td, _ = make_batch(policy_q)
    g_inner, m_inner, l_inner = engine_step(policy, inner, td.clone(), micro=2)
    g_wrap, m_wrap, l_wrap = engine_step(policy, wrapped, td.clone(), micro=2)
    assert torch.equal(g_inner, g_wrap) and l_inner == l_wrap
    assert [sorted(m) for m in m_inner] == [sorted(m) for m in m_wrap]
    assert float(g_inner.abs().sum()) > 0


class _Allocations(TorchDispatchMode):
    """Every op output with at least ``limit`` elements that is not a view of ``base``."""

    def __init__(self, base: torch.Tensor, limit: int):
        super().__init__()
        self.base, self.limit, self.seen = base.untyped_storage().data_ptr(), limit, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if (isinstance(t, torch.Tensor) and not t.is_nested and t.numel() >= self.limit
                    and t.untyped_storage().data_ptr() != self.base):
                self.seen.append((str(func), tuple(t.shape)))
        return out


def test_record_pass_reads_the_response_rows_in_place_and_emits_int32_ids():
    """Issue 14: the probe's record is the record of the response rows (what ``logits[rows]`` gave)
    without an [M, V] copy of them; ids travel as int32, log-probs in the stored bf16."""
    from dyjr_verl.diagnostics.probe import probe_logits

    gen = torch.Generator().manual_seed(0)
    vocab, k, p_len, r_len, n_rows = 1024, 8, 20, 400, 12

    def jag(parts):
        return torch.nested.as_nested_tensor(list(parts), layout=torch.jagged)

    prompts = [torch.randint(0, vocab, (p_len,), generator=gen) for _ in range(n_rows)]
    responses = [torch.randint(0, vocab, (r_len,), generator=gen) for _ in range(n_rows)]
    td = tu.get_tensordict({"prompts": jag(prompts), "responses": jag(responses),
                            "input_ids": jag(torch.cat([p, r]) for p, r in zip(prompts, responses)),
                            "response_mask": jag(torch.ones(r_len, dtype=torch.int64) for _ in range(n_rows))})
    tu.assign_non_tensor(td, **{R.TOPK_RECORD_FLAG: k})
    logits = torch.randn(1, n_rows * (p_len + r_len), vocab, generator=gen)
    rows, _, _ = R.response_positions(td, logits.shape[1], logits.device)
    assert rows.numel() * vocab > R.TOPK_GATHER_ELEMS  # the top-k gather works in several blocks
    with _Allocations(logits, limit=rows.numel() * vocab) as allocations:
        out = probe_logits(logits, td)
    assert allocations.seen == []  # no [M, V] tensor besides the logits themselves
    want = R.build_topk_record(logits[0][rows], k)  # the old path: a copy of the response rows
    ids = torch.stack([out[f"{R.TOPK_RECORD_PREFIX}id{i}"][0] for i in range(k)], dim=-1)
    logp = torch.stack([out[f"{R.TOPK_RECORD_PREFIX}logp{i}"][0] for i in range(k)], dim=-1)
    rest = out[f"{R.TOPK_RECORD_PREFIX}log_rest"][0]
    assert ids.dtype == torch.int32 and logp.dtype == rest.dtype == torch.bfloat16
    assert torch.equal(ids[rows], want.ids) and torch.equal(logp[rows], want.logp)
    assert torch.equal(rest[rows], want.log_rest)
    off = torch.ones(logits.shape[1], dtype=torch.bool)
    off[rows] = False
    assert not ids[off].any() and not logp[off].any()  # prompt positions: not computed
