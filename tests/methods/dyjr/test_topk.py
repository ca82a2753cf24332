"""Exact top-k JS: JSD properties, agreement with full-vocabulary JSD, gradients against float64,
masking, bf16, records and storage, and the verl engine integration (logits-processor call +
replay-aware loss) on micro-batches laid out as verl's FSDP engine lays them out."""

from __future__ import annotations

import math
import pickle

import pytest
import torch

from verl.utils import tensordict_utils as tu
from verl.workers.config import ActorConfig, PolicyLossConfig
from verl.workers.utils.losses import ppo_loss

import dyjr_verl.diagnostics.topk_record as topk_record
import dyjr_verl.methods.dyjr.topk as T
from dyjr_verl.kernels import LOG_REST_FLOOR
from dyjr_verl.replay.rows import minibatch_normalizer_fields
from dyjr_verl.replay.terms import REPLAY_TERMS, ReplayLossSpec, make_replay_loss_fn
from dyjr_verl.diagnostics.topk_record import (
    TopKRecord,
    build_topk_record,
    record_from_topk_logprobs,
    topk_buffer_bytes,
    topk_record_bytes_per_token,
)
from dyjr_verl.methods.dyjr.topk import (
    TOPK_IDS_KEY,
    TOPK_JSD_KEY,
    TOPK_LOG_REST_KEY,
    TOPK_LOGP_KEY,
    TOPK_MASS_KEY,
    jsd_from_logprobs,
    make_topk_js_replay_loss_fn,
    topk_js_loss,
    topk_jsd,
    topk_jsd_from_hidden,
)

LOG2 = math.log(2.0)


# many small block ops: see the one_intra_op_thread fixture in conftest.py
pytestmark = pytest.mark.usefixtures("one_intra_op_thread")


def full_jsd(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """float64 JSD over the last dim of two probability tensors (0 log 0 = 0)."""
    m = 0.5 * (p + q)
    kl = lambda a: torch.where(a > 0, a * (torch.log(a) - torch.log(m)), torch.zeros_like(a))  # noqa: E731
    return 0.5 * (kl(p) + kl(q)).sum(-1)


def lumped(p: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """(p_ids..., p_rest) in float64 from full distributions p [..., V] and ids [..., k]."""
    top = p.gather(-1, ids.long())
    rest = (p.scatter(-1, ids.long(), 0.0)).sum(-1, keepdim=True)
    return torch.cat([top, rest], -1)


def distinct_ids(shape, vocab, k, gen):
    return torch.argsort(torch.rand(*shape, vocab, generator=gen), dim=-1)[..., :k]


# ----------------------------------------------------------------------------------------------
# JSD properties
# ----------------------------------------------------------------------------------------------


def test_jsd_zero_symmetric_bounded():
    gen = torch.Generator().manual_seed(0)
    a = torch.log_softmax(torch.randn(500, 9, generator=gen, dtype=torch.float64) * 3, -1)
    b = torch.log_softmax(torch.randn(500, 9, generator=gen, dtype=torch.float64) * 3, -1)
    assert torch.all(jsd_from_logprobs(a, a) == 0)
    assert torch.equal(jsd_from_logprobs(a, b), jsd_from_logprobs(b, a))
    j = jsd_from_logprobs(a, b)
    assert torch.all(j >= 0) and torch.all(j <= LOG2 + 1e-12)
    torch.testing.assert_close(j, full_jsd(a.exp(), b.exp()), rtol=1e-10, atol=1e-12)
    # disjoint supports reach log 2; -inf log-probs are fine
    p = torch.tensor([[0.0, float("-inf")]])
    q = torch.tensor([[float("-inf"), 0.0]])
    torch.testing.assert_close(jsd_from_logprobs(p, q), torch.tensor([LOG2]), rtol=1e-6, atol=1e-6)
    # bf16 inputs are upcast; result finite
    assert torch.isfinite(jsd_from_logprobs(a.to(torch.bfloat16), b.to(torch.bfloat16))).all()


def test_zero_when_record_is_the_current_distribution():
    gen = torch.Generator().manual_seed(1)
    z = torch.randn(3, 7, 200, generator=gen) * 3
    rec = build_topk_record(z, 16, temperature=0.8, dtype=torch.float32)
    j = topk_jsd(z, rec, temperature=0.8)
    assert j.shape == (3, 7)
    assert float(j.abs().max()) < 1e-6
    rec16 = build_topk_record(z, 16, temperature=0.8)  # bf16 storage: rounding only
    assert float(topk_jsd(z, rec16, temperature=0.8).max()) < 1e-4


def test_matches_full_vocabulary_jsd_when_k_is_v_minus_1():
    gen = torch.Generator().manual_seed(2)
    vocab = 40
    zp = torch.randn(64, vocab, generator=gen, dtype=torch.float64) * 2
    zq = torch.randn(64, vocab, generator=gen, dtype=torch.float64) * 2
    ids = distinct_ids((64,), vocab, vocab - 1, gen)
    q = torch.softmax(zq, -1)
    lq = lumped(q, ids).log()
    rec = TopKRecord(ids.to(torch.int32), lq[:, :-1].float(), lq[:, -1].float())
    got = topk_jsd(zp.float(), rec)
    torch.testing.assert_close(got.double(), full_jsd(torch.softmax(zp, -1), q), rtol=1e-5, atol=1e-6)


def test_matches_full_jsd_when_stored_support_holds_all_mass_and_lower_bound_otherwise():
    gen = torch.Generator().manual_seed(3)
    vocab, k = 300, 12
    zp = torch.randn(50, vocab, generator=gen, dtype=torch.float64) * 2
    ids = distinct_ids((50,), vocab, k, gen)
    q_top = torch.softmax(torch.randn(50, k, generator=gen, dtype=torch.float64), -1)
    q = torch.zeros(50, vocab, dtype=torch.float64).scatter(-1, ids, q_top)  # no mass outside the ids
    rec = TopKRecord(ids.to(torch.int32), q_top.log().float(), torch.full((50,), float("-inf")))
    got = topk_jsd(zp.float(), rec)
    torch.testing.assert_close(got.double(), full_jsd(torch.softmax(zp, -1), q), rtol=1e-5, atol=1e-6)
    # a general Q: the lumped JSD is a lower bound of the full one
    zq = torch.randn(50, vocab, generator=gen, dtype=torch.float64) * 2
    q2 = torch.softmax(zq, -1)
    l2 = lumped(q2, ids).log()
    got2 = topk_jsd(zp.float(), TopKRecord(ids.to(torch.int32), l2[:, :-1].float(), l2[:, -1].float()))
    assert torch.all(got2.double() <= full_jsd(torch.softmax(zp, -1), q2) + 1e-6)


# ----------------------------------------------------------------------------------------------
# gradients, masking, dtypes
# ----------------------------------------------------------------------------------------------


def reference_topk_jsd(z64: torch.Tensor, rec: TopKRecord, temperature: float) -> torch.Tensor:
    p = torch.softmax(z64 / temperature, -1)
    lp = lumped(p, rec.ids).clamp(min=1e-30).log()
    lq = torch.cat([rec.logp.double(), rec.log_rest.double()[..., None]], -1)
    return jsd_from_logprobs(lp, lq)


@pytest.mark.parametrize("k", [1, 8, 32])
def test_gradient_matches_float64(k):
    gen = torch.Generator().manual_seed(10 + k)
    temperature = float(torch.empty(1).uniform_(0.5, 1.5, generator=gen))
    z = (torch.randn(4, 30, 500, generator=gen) * 2).requires_grad_()
    rec = build_topk_record(z.detach() + torch.randn(z.shape, generator=gen), k, temperature=temperature, dtype=torch.float32)
    mask = torch.rand(4, 30, generator=gen) > 0.2
    w = torch.rand(4, 30, generator=gen, dtype=torch.float64)
    j = topk_jsd(z, rec, mask, temperature=temperature)
    (g,) = torch.autograd.grad((j.double() * w).sum(), z)
    zz = z.detach().double().requires_grad_()
    jr = reference_topk_jsd(zz, rec, temperature) * mask
    torch.testing.assert_close(j.double(), jr, rtol=1e-5, atol=1e-6)
    (gr,) = torch.autograd.grad((jr * w).sum(), zz)
    torch.testing.assert_close(g.double(), gr, rtol=1e-4, atol=1e-6)


def test_masked_positions_contribute_nothing():
    gen = torch.Generator().manual_seed(4)
    z = torch.randn(2, 9, 64, generator=gen)
    rec = build_topk_record(z, 4, dtype=torch.float32)
    mask = torch.ones(2, 9, dtype=torch.bool)
    mask[0, 3] = mask[1, 0] = mask[1, 8] = False
    z[0, 3] = float("nan")  # garbage where masked
    z[1, 0] = float("inf")
    z.requires_grad_()
    loss, term = topk_js_loss(z, rec, mask)
    assert torch.isfinite(loss) and torch.all(term[~mask] == 0)
    (g,) = torch.autograd.grad(loss, z)
    assert torch.isfinite(g).all() and torch.count_nonzero(g[~mask]) == 0
    torch.testing.assert_close(loss, 2.0 * term[mask].sum() / (2.0 * mask.sum()), rtol=1e-6, atol=0)


def test_bf16_logits_and_record():
    gen = torch.Generator().manual_seed(5)
    z32 = torch.randn(6, 40, 1000, generator=gen) * 3
    zq = z32 + torch.randn(z32.shape, generator=gen) * 0.5
    rec = build_topk_record(zq, 8)  # bf16 log-probs
    assert rec.ids.dtype == torch.int32 and rec.logp.dtype == torch.bfloat16 and rec.log_rest.dtype == torch.bfloat16
    z16 = z32.to(torch.bfloat16).requires_grad_()
    j16 = topk_jsd(z16, rec)
    (g,) = torch.autograd.grad(j16.sum(), z16)
    assert g.dtype == torch.bfloat16 and torch.isfinite(g.float()).all()
    j32 = topk_jsd(z16.detach().float(), rec)
    torch.testing.assert_close(j16, j32, rtol=1e-5, atol=1e-7)  # the kernel is fp32-exact on bf16 input
    rec32 = build_topk_record(zq, 8, dtype=torch.float32)
    torch.testing.assert_close(j16, topk_jsd(z32, rec32), rtol=0.05, atol=2e-3)  # bf16 rounding of inputs


def test_hidden_state_path_matches_logits_path():
    gen = torch.Generator().manual_seed(6)
    h = torch.randn(3, 11, 16, generator=gen).requires_grad_()
    w = (torch.randn(700, 16, generator=gen) * 0.4).requires_grad_()
    rec = build_topk_record((h @ w.T).detach() + 0.2, 5, temperature=0.7, dtype=torch.float32)
    mask = torch.rand(3, 11, generator=gen) > 0.3
    a = topk_jsd_from_hidden(h, w, rec, mask, temperature=0.7, chunk_size=128)
    ga = torch.autograd.grad(a.sum(), (h, w))
    b = topk_jsd(h @ w.T, rec, mask, temperature=0.7)
    gb = torch.autograd.grad(b.sum(), (h, w))
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    for x, y in zip(ga, gb):
        torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-6)


def test_topk_js_loss_normalisers_follow_agg_loss():
    gen = torch.Generator().manual_seed(7)
    z = torch.randn(3, 5, 50, generator=gen).requires_grad_()
    rec = build_topk_record(torch.randn(3, 5, 50, generator=gen), 4, dtype=torch.float32)
    mask = torch.rand(3, 5, generator=gen) > 0.3
    _, term = topk_js_loss(z, rec, mask)
    loss, _ = topk_js_loss(z, rec, mask, dp_size=2, batch_num_tokens=40.0)
    torch.testing.assert_close(loss, term[mask].sum() * 2 / 40.0)
    loss_sum, _ = topk_js_loss(z, rec, mask, loss_agg_mode="token-sum")
    torch.testing.assert_close(loss_sum, term[mask].sum())


# ----------------------------------------------------------------------------------------------
# records and storage
# ----------------------------------------------------------------------------------------------


def test_build_record_is_exact_top_k():
    gen = torch.Generator().manual_seed(8)
    z = torch.randn(7, 300, generator=gen, dtype=torch.float64) * 2
    rec = build_topk_record(z, 6, temperature=1.4, dtype=torch.float32)
    lp = torch.log_softmax(z / 1.4, -1)
    top = lp.topk(6, -1)
    assert torch.equal(rec.ids.long(), top.indices)
    torch.testing.assert_close(rec.logp.double(), top.values, rtol=0, atol=1e-6)
    rest = torch.logsumexp(lp.scatter(-1, top.indices, float("-inf")), -1)
    torch.testing.assert_close(rec.log_rest.double(), rest, rtol=0, atol=1e-6)
    again = record_from_topk_logprobs(rec.ids, rec.logp, dtype=torch.float32)  # engine-style record
    torch.testing.assert_close(again.log_rest.double(), rest, rtol=0, atol=1e-5)
    # a record whose top-k hold everything: rest clamps to the floor, JSD stays finite
    full = record_from_topk_logprobs(torch.tensor([[0, 1]]), torch.log(torch.tensor([[0.25, 0.75]])))
    assert float(full.log_rest) == pytest.approx(LOG_REST_FLOOR, abs=0.5)


def test_storage_estimate():
    assert topk_record_bytes_per_token(8) == 8 * 6 + 2
    assert topk_record_bytes_per_token(8, logp_dtype=torch.float32) == 8 * 8 + 4
    assert topk_record_bytes_per_token(0) == 2
    assert topk_buffer_bytes(32, 1000, rest_dtype=torch.float32) == 1000 * (32 * 6 + 4)
    with pytest.raises(ValueError):
        topk_record_bytes_per_token(-1)


# ----------------------------------------------------------------------------------------------
# verl engine integration
# ----------------------------------------------------------------------------------------------

V = 13


class PackedPolicy(torch.nn.Module):
    """logits(packed position) = emb[token] + pos[offset in row]: the (nnz, V) tensor the FSDP
    engine hands to the logits processor (temperature already applied), in row order."""

    def __init__(self, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.emb = torch.nn.Parameter(torch.randn(V, V, generator=g, dtype=torch.float64))
        self.pos = torch.nn.Parameter(torch.randn(32, V, generator=g, dtype=torch.float64))

    def logits(self, mb):
        return torch.cat([self.emb[s] + self.pos[: len(s)] for s in mb["input_ids"].unbind()])


def _jag(rows):
    return torch.nested.as_nested_tensor(list(rows), layout=torch.jagged)


def make_batch(policy_q: PackedPolicy, n_rows=6, replay_rows=(1, 2, 4), k=4, seed=1, nested_record=False):
    g = torch.Generator().manual_seed(seed)
    prompts, responses, masks, old, adv, stored = [], [], [], [], [], []
    for i in range(n_rows):
        p_len, r_len = int(torch.randint(1, 4, (1,), generator=g)), int(torch.randint(2, 7, (1,), generator=g))
        prompts.append(torch.randint(0, V, (p_len,), generator=g))
        responses.append(torch.randint(0, V, (r_len,), generator=g))
        m = torch.ones(r_len, dtype=torch.int64)
        if i % 3 == 2:
            m[-1] = 0
        masks.append(m)
        old.append(-torch.rand(r_len, generator=g) - 0.5)
        adv.append(torch.full((r_len,), float(torch.randn(1, generator=g))))
        stored.append(-torch.rand(r_len, generator=g) - 0.5)
    td = tu.get_tensordict(
        {
            "prompts": _jag(prompts),
            "responses": _jag(responses),
            "input_ids": _jag(torch.cat([p, r]) for p, r in zip(prompts, responses)),
            "response_mask": _jag(masks),
            "loss_mask": _jag(masks),
            "old_log_probs": _jag(old),
            "advantages": _jag(adv),
            "stored_log_probs": _jag(stored),
            "replay_mask": torch.tensor([1.0 if i in replay_rows else 0.0 for i in range(n_rows)]),
        }
    )
    # the stored top-k record of the *generating* policy (policy_q), response-aligned
    with torch.no_grad():
        zq = policy_q.logits(td)
    ends = torch.cumsum(torch.tensor([len(p) + len(r) for p, r in zip(prompts, responses)]), 0)
    width = max(len(r) for r in responses)
    ids = torch.zeros(n_rows, width, k, dtype=torch.int32)
    logp = torch.zeros(n_rows, width, k, dtype=torch.bfloat16)
    lrest = torch.zeros(n_rows, width, dtype=torch.bfloat16)
    for b, r in enumerate(responses):
        start = int(ends[b]) - len(r) - 1
        rec = build_topk_record(zq[start : start + len(r)], k)
        ids[b, : len(r)], logp[b, : len(r)], lrest[b, : len(r)] = rec
    if nested_record:
        lens = [len(r) for r in responses]
        td[TOPK_IDS_KEY] = _jag(ids[b, : lens[b]] for b in range(n_rows))
        td[TOPK_LOGP_KEY] = _jag(logp[b, : lens[b]] for b in range(n_rows))
        td[TOPK_LOG_REST_KEY] = _jag(lrest[b, : lens[b]] for b in range(n_rows))
    else:
        td[TOPK_IDS_KEY], td[TOPK_LOGP_KEY], td[TOPK_LOG_REST_KEY] = ids, logp, lrest
    tokens = torch.stack([m.sum() for m in td["response_mask"].unbind()])
    for key, v in minibatch_normalizer_fields(td["replay_mask"] > 0.5, tokens, mini_batch_size=n_rows).items():
        td[key] = v
    return td, ends


def actor_config():
    return ActorConfig(
        strategy="fsdp",
        rollout_n=2,
        ppo_micro_batch_size_per_gpu=1,
        policy_loss=PolicyLossConfig(loss_mode="vanilla"),
        loss_agg_mode="token-mean",
    )


def engine_step(policy, loss_fn, td, micro=1):
    """What FSDPEngineWithLMHead does per micro-batch with distillation_use_topk=True."""
    policy.zero_grad(set_to_none=True)
    n = len(td)
    tokens = int(sum(int(m.sum()) for m in td["loss_mask"].unbind()))
    tu.assign_non_tensor(td, dp_size=1, batch_num_tokens=tokens, global_batch_size=n)
    metrics, total = [], 0.0
    for mb in tu.chunk_tensordict(td, micro):
        logits = policy.logits(mb)
        cu = mb["input_ids"].offsets()
        out = loss_fn(student_logits=logits.unsqueeze(0), data=mb)
        model_output = {k: torch.nested.nested_tensor_from_jagged(v.squeeze(0), cu) for k, v in out.items()}
        labels = torch.cat([torch.roll(s, -1) for s in mb["input_ids"].unbind()])
        lp = torch.log_softmax(logits, -1).gather(-1, labels[:, None]).squeeze(-1)
        model_output["log_probs"] = torch.nested.nested_tensor_from_jagged(lp, cu)
        loss, m = loss_fn(model_output=model_output, data=mb, dp_group=None)
        loss.backward()
        total += float(loss.detach())
        metrics.append(m)
    return torch.cat([p.grad.reshape(-1) for p in policy.parameters()]).clone(), metrics, total


def reference_grad(policy, policy_q, config, td, ends, coef):
    """ppo_loss on the fresh rows alone + coef * 2 * mean full-vocab-lumped JSD over replay tokens."""
    policy.zero_grad(set_to_none=True)
    rows = [i for i in range(len(td)) if float(td["replay_mask"][i]) < 0.5]
    sub = tu.index_select_tensor_dict(td, torch.tensor(rows))
    tokens = int(sum(int(m.sum()) for m in sub["response_mask"].unbind()))
    tu.assign_non_tensor(sub, dp_size=1, batch_num_tokens=tokens, global_batch_size=len(rows))
    logits = policy.logits(sub)
    labels = torch.cat([torch.roll(s, -1) for s in sub["input_ids"].unbind()])
    lp = torch.log_softmax(logits, -1).gather(-1, labels[:, None]).squeeze(-1)
    fresh, _ = ppo_loss(config, {"log_probs": torch.nested.nested_tensor_from_jagged(lp, sub["input_ids"].offsets())}, sub)
    z = policy.logits(td)
    terms = []
    for b in range(len(td)):
        if float(td["replay_mask"][b]) < 0.5:
            continue
        r = len(td["responses"][b])
        start = int(ends[b]) - r - 1
        keep = td["response_mask"][b].bool()
        ids = td[TOPK_IDS_KEY][b][:r].long() if td[TOPK_IDS_KEY].is_nested else td[TOPK_IDS_KEY][b, :r].long()
        lq_top = td[TOPK_LOGP_KEY][b][:r] if td[TOPK_LOGP_KEY].is_nested else td[TOPK_LOGP_KEY][b, :r]
        lq_rest = td[TOPK_LOG_REST_KEY][b][:r] if td[TOPK_LOG_REST_KEY].is_nested else td[TOPK_LOG_REST_KEY][b, :r]
        p = torch.softmax(z[start : start + r], -1)
        lp_l = lumped(p, ids).clamp(min=1e-30).log()
        lq = torch.cat([lq_top.double(), lq_rest.double()[:, None]], -1)
        terms.append(jsd_from_logprobs(lp_l, lq)[keep])
    jsd = torch.cat(terms)
    (fresh + coef * 2.0 * jsd.mean()).backward()
    return torch.cat([p.grad.reshape(-1) for p in policy.parameters()]).clone(), float(jsd.detach().mean())


@pytest.mark.parametrize("nested_record,micro", [(False, 1), (True, 3)])
def test_engine_integration_matches_reference(nested_record, micro):
    policy, policy_q = PackedPolicy(0), PackedPolicy(1)
    td, ends = make_batch(policy_q, nested_record=nested_record)
    cfg = actor_config()
    spec = ReplayLossSpec(kind="topk_js", coef=0.2)
    fn = make_topk_js_replay_loss_fn(cfg, spec)
    fn = pickle.loads(pickle.dumps(fn))  # set_loss_fn ships it to the workers
    g, metrics, _ = engine_step(policy, fn, td, micro=micro)
    g_ref, jsd_mean = reference_grad(policy, policy_q, cfg, td, ends, coef=0.2)
    torch.testing.assert_close(g, g_ref, rtol=1e-4, atol=1e-7)
    if micro == 1:
        m = metrics[0]
        assert m["replay/term"].aggregate() == pytest.approx(2.0 * jsd_mean, rel=1e-4)
        assert 0.0 < m["replay/topk_cur_mass"].aggregate() < 1.0


def test_engine_integration_errors_and_registry():
    assert "topk_js" in REPLAY_TERMS and REPLAY_TERMS["topk_js"].default_coef == 0.1
    policy, policy_q = PackedPolicy(0), PackedPolicy(1)
    td, _ = make_batch(policy_q)
    cfg = actor_config()
    # the plain replay loss cannot provide the JSD: clear error
    plain = make_replay_loss_fn(cfg, ReplayLossSpec(kind="topk_js"))
    tu.assign_non_tensor(td, dp_size=1, batch_num_tokens=20, global_batch_size=len(td))
    logits = policy.logits(td)
    labels = torch.cat([torch.roll(s, -1) for s in td["input_ids"].unbind()])
    lp = torch.log_softmax(logits, -1).gather(-1, labels[:, None]).squeeze(-1)
    mo = {"log_probs": torch.nested.nested_tensor_from_jagged(lp, td["input_ids"].offsets())}
    with pytest.raises(RuntimeError, match="make_topk_js_replay_loss_fn"):
        plain(model_output=mo, data=td, dp_group=None)
    # the flag was not set: no JSD in model_output
    fn = make_topk_js_replay_loss_fn(cfg)
    with pytest.raises(KeyError, match="distillation_use_topk"):
        fn(model_output=mo, data=td, dp_group=None)
    with pytest.raises(ValueError, match="topk_js"):
        make_topk_js_replay_loss_fn(cfg, ReplayLossSpec(kind="js"))
    # missing record fields
    bad = td.exclude(TOPK_LOGP_KEY)
    with pytest.raises(KeyError, match="record"):
        fn(student_logits=logits[None], data=bad)


def test_logits_processor_sequence_parallel_slices(monkeypatch):
    """With Ulysses SP the processor sees one rank's contiguous slice of the (padded) packed stream."""
    policy, policy_q = PackedPolicy(0), PackedPolicy(1)
    td, _ = make_batch(policy_q)
    with torch.no_grad():
        logits = policy.logits(td)
        full = T.topk_js_logits_processor(logits[None], td)
        nnz = logits.shape[0]
        sp = 3
        per = -(-nnz // sp)
        padded = torch.cat([logits, torch.full((per * sp - nnz, V), float("nan"), dtype=logits.dtype)])
        parts = []
        for rank in range(sp):
            monkeypatch.setattr(topk_record, "_sp_world_rank", lambda rank=rank: (sp, rank))
            parts.append(T.topk_js_logits_processor(padded[rank * per : (rank + 1) * per][None], td))
    for key in (TOPK_JSD_KEY, TOPK_MASS_KEY):
        got = torch.cat([p[key].squeeze(0) for p in parts])[:nnz]
        torch.testing.assert_close(got, full[key].squeeze(0))
        assert float(full[key].abs().sum()) > 0




# ----------------------------------------------------------------------------------------------
# the record on the update's rows (issue 14: jagged, replayed rows only)
# ----------------------------------------------------------------------------------------------


def test_record_fields_are_jagged_at_each_rows_length_and_empty_on_fresh_rows():
    gen = torch.Generator().manual_seed(3)
    a = build_topk_record(torch.randn(3, 20, generator=gen), 4)
    b = build_topk_record(torch.randn(5, 20, generator=gen), 4)
    fields = T.record_fields([a, None, b, None])
    assert fields[TOPK_IDS_KEY].dtype == torch.int32 and fields[TOPK_LOGP_KEY].dtype == torch.bfloat16
    for key, name in ((TOPK_IDS_KEY, "ids"), (TOPK_LOGP_KEY, "logp"), (TOPK_LOG_REST_KEY, "log_rest")):
        t = fields[key]
        assert t.is_nested and t.offsets().diff().tolist() == [3, 0, 5, 0], key  # not padded to a width
        parts = t.unbind()
        assert torch.equal(parts[0], getattr(a, name)) and torch.equal(parts[2], getattr(b, name))
        assert parts[1].numel() == 0 and parts[3].numel() == 0
    assert T.record_fields([None, None]) == {}


def test_engine_integration_with_records_on_replayed_rows_only():
    """The update's fields: a replayed row's record at its response length, an empty one on fresh
    rows (here the widest row is fresh); verl's micro-batch split of them and the loss give the
    reference gradient."""
    policy, policy_q = PackedPolicy(0), PackedPolicy(1)
    lengths = make_batch(policy_q, seed=5)[0]["responses"].offsets().diff().tolist()
    widest = max(range(len(lengths)), key=lengths.__getitem__)
    replay_rows = tuple(i for i in range(len(lengths)) if lengths[i] < lengths[widest])[:3]
    td, ends = make_batch(policy_q, seed=5, replay_rows=replay_rows, nested_record=True)
    records = [TopKRecord(td[TOPK_IDS_KEY][b], td[TOPK_LOGP_KEY][b], td[TOPK_LOG_REST_KEY][b])
               if b in replay_rows else None for b in range(len(td))]
    for key, value in T.record_fields(records).items():
        td[key] = value
    assert td[TOPK_IDS_KEY].offsets().diff()[widest] == 0
    cfg = actor_config()
    fn = make_topk_js_replay_loss_fn(cfg, ReplayLossSpec(kind="topk_js", coef=0.2))
    g_ref, _ = reference_grad(policy, policy_q, cfg, td.clone(), ends, coef=0.2)
    for micro in (1, 2, 3):
        g, _, _ = engine_step(policy, fn, td.clone(), micro=micro)
        torch.testing.assert_close(g, g_ref, rtol=1e-4, atol=1e-7)
    # a replayed row whose record is shorter than its response is refused, never read as zeros
    short = list(records)
    short[replay_rows[0]] = None
    bad = td.clone()
    for key, value in T.record_fields(short).items():
        bad[key] = value
    with pytest.raises(ValueError, match="as long as each replayed row"):
        fn(student_logits=policy.logits(bad)[None], data=bad)
