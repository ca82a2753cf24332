"""The replay-aware engine loss against verl's own ppo_loss, on micro-batches built as verl's
FSDP engine builds them (jagged per-token fields, NonTensorData scalars, full-sequence jagged
log_probs from a differentiable toy policy)."""

from __future__ import annotations

import math
import pickle

import pytest
import torch
import torch.nn.functional as F

from verl.utils import tensordict_utils as tu
from verl.workers.config import ActorConfig, PolicyLossConfig
from verl.workers.utils.losses import ppo_loss
from verl.workers.utils.padding import no_padding_2_padding

from dyjr_verl.methods.dyjr.divergence import f_js_from_log
import dyjr_verl.methods.exgrpo.loss  # noqa: F401  (registers the shaped_pg term)
from dyjr_verl.methods.dyjr.divergence import dyjr_loss_spec
from dyjr_verl.replay.loss import replay_aware_loss
from dyjr_verl.replay.rows import (
    FRESH_RESPONSE_TOKENS_KEY,
    FRESH_SEQS_KEY,
    FRESH_TOKENS_KEY,
    NORMALIZER_KEYS,
    REPLAY_SEQS_KEY,
    REPLAY_TOKENS_KEY,
    minibatch_normalizer_fields,
)
from dyjr_verl.replay.terms import ReplayLossSpec, make_replay_loss_fn

V, LMAX = 7, 24


class TinyPolicy(torch.nn.Module):
    """logits(position j) = emb[token_j] + pos[j]; log_probs[j] = log p(token_{j+1}), packed and
    wrapped as a jagged nested tensor over the full sequence, like verl's remove-padding path."""

    def __init__(self, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.emb = torch.nn.Parameter(torch.randn(V, V, generator=g, dtype=torch.float64) * 0.7)
        self.pos = torch.nn.Parameter(torch.randn(LMAX, V, generator=g, dtype=torch.float64) * 0.7)

    def forward(self, micro_batch, entropy: bool = False, dtype=torch.float64):
        ids = micro_batch["input_ids"]
        lps, ents = [], []
        for seq in ids.unbind():
            logits = self.emb[seq] + self.pos[: len(seq)]
            logp = F.log_softmax(logits, dim=-1)
            labels = torch.roll(seq, -1)
            lps.append(logp.gather(-1, labels[:, None]).squeeze(-1))
            ents.append(-(logp.exp() * logp).sum(-1))
        offsets = ids.offsets()
        out = {"log_probs": torch.nested.nested_tensor_from_jagged(torch.cat(lps).to(dtype), offsets)}
        if entropy:
            out["entropy"] = torch.nested.nested_tensor_from_jagged(torch.cat(ents).to(dtype), offsets)
        return out


def _jag(rows):
    return torch.nested.as_nested_tensor(list(rows), layout=torch.jagged)


def make_batch(n_rows=8, replay_rows=(1, 4, 6), seed=1, zero_replay_adv=False, extreme=False):
    """One optimizer mini-batch as the trainer hands it to update_actor (dp ranks not yet split)."""
    g = torch.Generator().manual_seed(seed)
    prompts, responses, masks, old, adv, ref, stored = [], [], [], [], [], [], []
    for i in range(n_rows):
        p_len = int(torch.randint(1, 4, (1,), generator=g))
        r_len = int(torch.randint(2, 7, (1,), generator=g))
        prompts.append(torch.randint(0, V, (p_len,), generator=g))
        responses.append(torch.randint(0, V, (r_len,), generator=g))
        m = torch.ones(r_len, dtype=torch.int64)
        if i % 3 == 2:
            m[-1] = 0  # e.g. a masked tool/EOS token
        masks.append(m)
        old.append((-torch.rand(r_len, generator=g) * 2.0).to(torch.bfloat16))
        a = float(torch.randn(1, generator=g))
        is_rep = i in replay_rows
        adv.append(torch.full((r_len,), 0.0 if (zero_replay_adv and is_rep) else a))
        ref.append((-torch.rand(r_len, generator=g) * 2.0).to(torch.bfloat16))
        st = -torch.rand(r_len, generator=g) * 2.0
        if extreme and is_rep:
            st[0] = -60.0  # u = e^~58: clamped
            st[-1] = 0.0
        stored.append(st.to(torch.bfloat16))
    replay_mask = torch.tensor([1.0 if i in replay_rows else 0.0 for i in range(n_rows)])
    td = tu.get_tensordict(
        {
            "prompts": _jag(prompts),
            "responses": _jag(responses),
            "input_ids": _jag(torch.cat([p, r]) for p, r in zip(prompts, responses)),
            "response_mask": _jag(masks),
            "loss_mask": _jag(masks),
            "old_log_probs": _jag(old),
            "advantages": _jag(adv),
            "ref_log_prob": _jag(ref),
            "stored_log_probs": _jag(stored),
            "replay_mask": replay_mask,
        }
    )
    return td


def add_normalizers(td, mini_batch_size, dp_size=1):
    tokens = torch.stack([m.sum() for m in td["response_mask"].unbind()])
    fields = minibatch_normalizer_fields(
        td["replay_mask"] > 0.5, tokens, mini_batch_size=mini_batch_size, dp_size=dp_size
    )
    for k, v in fields.items():
        td[k] = v
    return td


def actor_config(loss_agg_mode="token-mean", kl=False, entropy_coeff=0.0, loss_mode="vanilla"):
    return ActorConfig(
        strategy="fsdp",
        rollout_n=2,
        ppo_micro_batch_size_per_gpu=1,
        policy_loss=PolicyLossConfig(loss_mode=loss_mode),
        loss_agg_mode=loss_agg_mode,
        use_kl_loss=kl,
        kl_loss_coef=0.05,
        entropy_coeff=entropy_coeff,
        calculate_entropy=entropy_coeff > 0,
    )


def engine_grads(model, loss_fn, minibatch, *, micro=1, dp=1, perm=None, entropy=False, lp_dtype=torch.float64):
    """What verl's FSDP engine does for one mini-batch: split over dp ranks (contiguous chunks),
    set the global scalars, cut each rank's rows into micro-batches, backward each loss, and let
    FSDP average the ranks' gradients. Returns (flat gradient, per-micro-batch metrics, losses)."""
    model.zero_grad(set_to_none=True)
    td = minibatch if perm is None else tu.index_select_tensor_dict(minibatch, perm)
    n = len(td)
    batch_num_tokens = int(sum(int(m.sum()) for m in td["loss_mask"].unbind()))
    rank_grads, metrics, losses = [], [], []
    for rank_td in tu.chunk_tensordict(td, dp):
        tu.assign_non_tensor(rank_td, dp_size=dp, batch_num_tokens=batch_num_tokens, global_batch_size=n)
        model.zero_grad(set_to_none=True)
        for mb in tu.chunk_tensordict(rank_td, micro):
            out = model(mb, entropy=entropy, dtype=lp_dtype)
            loss, m = loss_fn(model_output=out, data=mb, dp_group=None)
            assert torch.isfinite(loss), loss
            loss.backward()
            metrics.append(m)
            losses.append(float(loss.detach()))
        rank_grads.append(torch.cat([p.grad.reshape(-1).clone() for p in model.parameters()]))
    return torch.stack(rank_grads).mean(0), metrics, losses


def replay_log_u(model, td, log_u_clamp=20.0):
    """(clamped log u = log pi_theta - stored, response mask) of the replay rows, padded, by hand."""
    model.zero_grad(set_to_none=True)
    rows = [i for i in range(len(td)) if float(td["replay_mask"][i]) > 0.5]
    sub = tu.index_select_tensor_dict(td, torch.tensor(rows))
    lp = no_padding_2_padding(model(sub)["log_probs"], sub)
    pad = sub.select("response_mask", "stored_log_probs").to_padded_tensor()
    mask = pad["response_mask"].bool()
    log_u = torch.where(mask, lp - pad["stored_log_probs"].double(), torch.zeros_like(lp)).clamp(-log_u_clamp, log_u_clamp)
    return log_u, mask


def replay_reference_grad(model, td, coef, loss_agg_mode="token-mean", log_u_clamp=20.0):
    """coef * (mean over replay tokens of f_JS) computed by hand (token-mean over replay tokens,
    or the seq-mean forms over replay rows)."""
    log_u, mask = replay_log_u(model, td, log_u_clamp)
    f = f_js_from_log(log_u) * mask
    if loss_agg_mode == "token-mean":
        val = f.sum() / mask.sum()
    elif loss_agg_mode == "token-sum":
        val = f.sum()
    elif loss_agg_mode == "seq-mean-token-mean":
        val = (f.sum(-1) / mask.sum(-1)).mean()
    else:  # seq-mean-token-sum
        val = f.sum(-1).mean()
    (coef * val).backward()
    return torch.cat([p.grad.reshape(-1).clone() for p in model.parameters()])


def fresh_reference_grad(model, config, td, entropy=False):
    """verl's ppo_loss alone on the fresh rows, as a mini-batch of their own."""
    model.zero_grad(set_to_none=True)
    rows = [i for i in range(len(td)) if float(td["replay_mask"][i]) < 0.5]
    sub = tu.index_select_tensor_dict(td, torch.tensor(rows))
    tokens = int(sum(int(m.sum()) for m in sub["response_mask"].unbind()))
    tu.assign_non_tensor(sub, dp_size=1, batch_num_tokens=tokens, global_batch_size=len(rows))
    loss, _ = ppo_loss(config, model(sub, entropy=entropy), sub)
    loss.backward()
    return torch.cat([p.grad.reshape(-1).clone() for p in model.parameters()])


def close(a, b):
    return torch.allclose(a, b, rtol=1e-9, atol=1e-12)


# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("loss_agg_mode", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "token-sum"])
def test_gradient_invariant_to_micro_batches_order_and_dp(loss_agg_mode):
    model = TinyPolicy()
    cfg = actor_config(loss_agg_mode)
    spec = ReplayLossSpec(kind="js", coef=0.3)
    fn = make_replay_loss_fn(cfg, spec)
    td = add_normalizers(make_batch(), mini_batch_size=8)

    g1, _, _ = engine_grads(model, fn, td, micro=1)
    g4, _, _ = engine_grads(model, fn, td, micro=4)
    g8, _, _ = engine_grads(model, fn, td, micro=8)
    assert close(g1, g4) and close(g1, g8)

    # replay rows moved among fresh rows (verl's balancing reorders rows): same gradient
    perm = torch.tensor([4, 0, 7, 1, 3, 6, 2, 5])
    gp, _, _ = engine_grads(model, fn, td, micro=4, perm=perm)
    assert close(g1, gp)

    # dp = 2 (contiguous chunks, FSDP averages the ranks' gradients)
    td2 = add_normalizers(make_batch(), mini_batch_size=8, dp_size=2)
    gd, _, _ = engine_grads(model, fn, td2, micro=2, dp=2)
    assert close(g1, gd)

    # = verl's ppo_loss on the fresh rows alone + coef * the replay term alone (separate normalisers)
    expected = fresh_reference_grad(model, cfg, td) + replay_reference_grad(model, td, 0.3, loss_agg_mode)
    assert close(g1, expected)


def test_fresh_only_batch_is_exactly_verl_ppo_loss():
    model = TinyPolicy()
    cfg = actor_config()
    td = add_normalizers(make_batch(replay_rows=()), mini_batch_size=8)
    fn = make_replay_loss_fn(cfg, ReplayLossSpec(kind="js"))
    ours, _, our_losses = engine_grads(model, fn, td, micro=4)
    ref_fn = lambda model_output, data, dp_group=None: ppo_loss(cfg, model_output, data, dp_group)  # noqa: E731
    theirs, _, their_losses = engine_grads(model, ref_fn, td, micro=4)
    assert torch.equal(ours, theirs)
    assert our_losses == their_losses


def test_replay_rows_get_only_the_replay_term_and_ignore_advantages():
    model = TinyPolicy()
    cfg = actor_config()
    fn = make_replay_loss_fn(cfg, ReplayLossSpec(kind="js", coef=0.5))
    td = add_normalizers(make_batch(), mini_batch_size=8)
    td0 = add_normalizers(make_batch(zero_replay_adv=True), mini_batch_size=8)
    g, _, _ = engine_grads(model, fn, td, micro=2)
    g0, _, _ = engine_grads(model, fn, td0, micro=2)
    assert close(g, g0)
    # coef = 0: replay rows contribute nothing at all
    fn0 = make_replay_loss_fn(cfg, ReplayLossSpec(kind="js", coef=0.0))
    gz, _, _ = engine_grads(model, fn0, td, micro=2)
    assert close(gz, fresh_reference_grad(model, cfg, td))


def test_kl_and_entropy_terms_still_work_on_fresh_rows_only():
    model = TinyPolicy()
    cfg = actor_config(kl=True, entropy_coeff=0.01)
    fn = make_replay_loss_fn(cfg, ReplayLossSpec(kind="js", coef=0.2))
    td = add_normalizers(make_batch(), mini_batch_size=8)
    g1, metrics, _ = engine_grads(model, fn, td, micro=1, entropy=True)
    g4, _, _ = engine_grads(model, fn, td, micro=4, entropy=True, perm=torch.tensor([6, 1, 0, 4, 7, 2, 5, 3]))
    assert close(g1, g4)
    assert "kl_loss" in metrics[0] and "actor/entropy_loss" in metrics[0]
    expected = fresh_reference_grad(model, cfg, td, entropy=True) + replay_reference_grad(model, td, 0.2)
    assert close(g1, expected)
    # and the options matter (the fresh part is not plain PG)
    plain = fresh_reference_grad(model, actor_config(), td) + replay_reference_grad(model, td, 0.2)
    assert not close(g1, plain)


def test_metrics_present_and_exact_token_means():
    model = TinyPolicy()
    cfg = actor_config()
    fn = make_replay_loss_fn(cfg, ReplayLossSpec(kind="js", coef=0.1))
    td = add_normalizers(make_batch(extreme=True), mini_batch_size=8)
    _, metrics, _ = engine_grads(model, fn, td, micro=4)
    keys = {"rows", "tokens", "fresh_tokens", "term", "loss", "coef", "u_mean", "u_outside", "drift", "log_u_mean",
            "weight_mean"}
    for m in metrics:
        assert {f"replay/{k}" for k in keys} <= set(m)
        assert "actor/pg_loss" in m

    def total(key):
        return sum(float(m[key].values[0]) for m in metrics)

    assert total("replay/rows") == 3
    n_rep = float(td[REPLAY_TOKENS_KEY][0])
    assert total("replay/tokens") == n_rep
    assert total("replay/fresh_tokens") == float(td[FRESH_RESPONSE_TOKENS_KEY][0])
    # exact token means (SUM over micro-batches of pre-normalised values)
    rows = [i for i in range(8) if float(td["replay_mask"][i]) > 0.5]
    sub = tu.index_select_tensor_dict(td, torch.tensor(rows))
    with torch.no_grad():
        lp = no_padding_2_padding(model(sub)["log_probs"], sub)
    pad = sub.select("response_mask", "stored_log_probs").to_padded_tensor()
    mask = pad["response_mask"].bool()
    lu = torch.where(mask, lp.float() - pad["stored_log_probs"].float(), torch.zeros_like(lp).float()).clamp(-20, 20)
    assert math.isclose(total("replay/drift"), float(lu.abs()[mask].mean()), rel_tol=1e-5)
    assert math.isclose(total("replay/log_u_mean"), float(lu[mask].mean()), rel_tol=1e-5)
    assert math.isclose(total("replay/u_mean"), float(lu.exp()[mask].mean()), rel_tol=1e-5)
    outside = ((lu.exp() < 0.5) | (lu.exp() > 2.0))[mask].float().mean()
    assert math.isclose(total("replay/u_outside"), float(outside), rel_tol=1e-5)
    assert math.isfinite(total("replay/term"))


def test_forward_kl_term_is_u_mean_minus_one_minus_log_u_mean_and_js_is_not():
    """f_KL = u - 1 - log u is linear in u and log u, so the logged term equals u_mean - 1 - log_u_mean
    (what the end-to-end forward-KL test checks on verl's trainer); f_JS is about half of it."""
    model = TinyPolicy()
    td = add_normalizers(make_batch(), mini_batch_size=8)

    def logged(kind):
        _, metrics, _ = engine_grads(model, make_replay_loss_fn(actor_config(), ReplayLossSpec(kind=kind, coef=0.1)),
                                     td, micro=4)
        return {k: sum(float(m[f"replay/{k}"].values[0]) for m in metrics) for k in ("term", "u_mean", "log_u_mean")}

    kl, js = logged("forward_kl"), logged("js")
    identity = kl["u_mean"] - 1.0 - kl["log_u_mean"]
    assert identity > 1e-3 and math.isclose(kl["term"], identity, rel_tol=1e-5)
    assert js["u_mean"] == pytest.approx(kl["u_mean"]) and js["term"] < 0.75 * identity


@pytest.mark.parametrize("kind", ["js", "shaped_pg"])
def test_no_nan_with_all_replay_or_all_fresh_micro_batches(kind):
    model = TinyPolicy()
    cfg = actor_config(kl=True, entropy_coeff=0.01)
    fn = make_replay_loss_fn(cfg, ReplayLossSpec(kind=kind, normalizer="separate"))
    # rows 0-3 replay, 4-7 fresh; micro=2 -> one all-replay and one all-fresh micro-batch
    td = add_normalizers(make_batch(replay_rows=(0, 1, 2, 3), extreme=True), mini_batch_size=8)
    g, metrics, losses = engine_grads(model, fn, td, micro=2, entropy=True, lp_dtype=torch.bfloat16)
    assert torch.isfinite(g).all() and all(math.isfinite(x) for x in losses)
    for m in metrics:
        for v in m.values():
            vals = v.values if hasattr(v, "values") else [v]
            assert all(math.isfinite(float(x)) for x in vals)
    # an all-replay mini-batch (fresh count 0) and an all-fresh one (replay count 0)
    for rows in [(0, 1, 2, 3, 4, 5, 6, 7), ()]:
        tdx = add_normalizers(make_batch(replay_rows=rows, extreme=True), mini_batch_size=8)
        g, _, losses = engine_grads(model, fn, tdx, micro=4, entropy=True)
        assert torch.isfinite(g).all() and all(math.isfinite(x) for x in losses)


def test_bf16_log_probs_match_fp32():
    model = TinyPolicy()
    cfg = actor_config()
    fn = make_replay_loss_fn(cfg, ReplayLossSpec(kind="js", coef=0.3))
    td = add_normalizers(make_batch(), mini_batch_size=8)
    g32, _, _ = engine_grads(model, fn, td, micro=2, lp_dtype=torch.float32)
    g16, _, _ = engine_grads(model, fn, td, micro=2, lp_dtype=torch.bfloat16)
    assert torch.isfinite(g16).all()
    assert torch.allclose(g16, g32, rtol=0.1, atol=2e-2)


def test_shaped_pg_term_and_joint_normaliser():
    """Ex-GRPO: -A * u/(u+beta) on replay tokens; joint normaliser = verl's single token count."""
    model = TinyPolicy()
    cfg = actor_config()
    spec = ReplayLossSpec(kind="shaped_pg")
    assert spec.resolved_coef == 1.0 and spec.resolved_normalizer == "joint"
    fn = make_replay_loss_fn(cfg, spec)
    td = make_batch()  # joint: no normaliser fields needed
    g1, metrics, _ = engine_grads(model, fn, td, micro=1)
    g4, _, _ = engine_grads(model, fn, td, micro=4, perm=torch.tensor([3, 1, 0, 7, 2, 6, 5, 4]))
    assert close(g1, g4)
    td_z = make_batch(zero_replay_adv=True)
    gz, _, _ = engine_grads(model, fn, td_z, micro=1)
    assert not close(g1, gz)  # advantages matter for shaped_pg

    # reference: ppo_loss over fresh tokens / all tokens + shaped term over replay tokens / all tokens
    n_all = int(sum(int(m.sum()) for m in td["response_mask"].unbind()))
    model.zero_grad(set_to_none=True)
    out = model(td)
    fresh = td.copy()
    keep = [float(x) < 0.5 for x in td["replay_mask"]]
    fresh["response_mask"] = _jag(r if k else torch.zeros_like(r) for r, k in zip(td["response_mask"].unbind(), keep))
    tu.assign_non_tensor(fresh, dp_size=1, batch_num_tokens=n_all, global_batch_size=8)
    pg, _ = ppo_loss(cfg, out, fresh)
    lp = no_padding_2_padding(out["log_probs"], td)
    pad = td.select("response_mask", "stored_log_probs", "advantages").to_padded_tensor()
    mask = pad["response_mask"].bool() & (td["replay_mask"] > 0.5)[:, None]
    lu = torch.where(mask, lp - pad["stored_log_probs"].double(), torch.zeros_like(lp))
    w = lu.exp()
    shaped = (-pad["advantages"].double() * w / (w + 0.1) * mask).sum() / n_all
    (pg + shaped).backward()
    ref = torch.cat([p.grad.reshape(-1).clone() for p in model.parameters()])
    assert close(g1, ref)
    assert all("replay/weight_mean" in m for m in metrics)


def test_strict_contract_errors():
    model = TinyPolicy()
    cfg = actor_config()
    td = make_batch()
    tu.assign_non_tensor(td, dp_size=1, batch_num_tokens=10, global_batch_size=8)
    out = model(td)
    # separate normaliser without its fields
    with pytest.raises(KeyError, match="fresh_tokens_in_minibatch"):
        replay_aware_loss(cfg, out, td, spec=ReplayLossSpec(kind="js"))
    # non-strict: falls back to verl's joint normaliser
    loss, _ = replay_aware_loss(cfg, out, td, spec=ReplayLossSpec(kind="js", strict=False))
    assert torch.isfinite(loss)
    # missing replay_mask
    bare = td.exclude("replay_mask")
    with pytest.raises(KeyError, match="replay_mask"):
        replay_aware_loss(cfg, out, bare, spec=ReplayLossSpec(kind="js", normalizer="joint"))
    loss, _ = replay_aware_loss(cfg, out, bare, spec=ReplayLossSpec(kind="js", normalizer="joint", strict=False))
    ref, _ = ppo_loss(cfg, out, td)
    assert torch.equal(loss, ref)
    # normaliser values differing inside one micro-batch
    bad = add_normalizers(make_batch(), mini_batch_size=8)
    tu.assign_non_tensor(bad, dp_size=1, batch_num_tokens=10, global_batch_size=8)
    bad[FRESH_TOKENS_KEY] = torch.arange(8, dtype=torch.float32)
    with pytest.raises(ValueError, match="same on every row"):
        replay_aware_loss(cfg, out, bad, spec=ReplayLossSpec(kind="js"))
    with pytest.raises(ValueError):
        ReplayLossSpec(kind="nope")
    with pytest.raises(ValueError):
        ReplayLossSpec(kind="js", coef=-1.0)


def test_minibatch_normalizer_fields_layout():
    # 16 rows, dp=2, global mini-batch 8 -> rank chunks [0..7], [8..15]; 4 rows per rank per mini-batch
    rep = torch.tensor([0, 1, 0, 0, 1, 1, 0, 0, 0, 0, 1, 0, 0, 0, 0, 1], dtype=torch.bool)
    tok = torch.arange(1, 17)
    f = minibatch_normalizer_fields(rep, tok, mini_batch_size=8, dp_size=2)
    mb0 = [0, 1, 2, 3, 8, 9, 10, 11]
    mb1 = [4, 5, 6, 7, 12, 13, 14, 15]
    for rows in (mb0, mb1):
        r = torch.tensor(rows)
        exp_rt = float((tok[r] * rep[r]).sum())
        exp_ft = float((tok[r] * ~rep[r]).sum())
        assert torch.all(f[REPLAY_TOKENS_KEY][r] == exp_rt) and torch.all(f[FRESH_TOKENS_KEY][r] == exp_ft)
        assert torch.all(f[REPLAY_SEQS_KEY][r] == float(rep[r].sum()))
        assert torch.all(f[FRESH_SEQS_KEY][r] + f[REPLAY_SEQS_KEY][r] == 8)
    fs = minibatch_normalizer_fields(rep, tok, mini_batch_size=8, dp_size=2, shuffle=True)
    assert torch.allclose(fs[REPLAY_TOKENS_KEY], torch.full((16,), float((tok * rep).sum()) / 2, dtype=torch.float64))
    assert set(f) == set(NORMALIZER_KEYS)
    assert all(v.dtype == torch.float64 and v.shape == (16,) for v in f.values())  # exact counts
    with pytest.raises(ValueError):
        minibatch_normalizer_fields(rep, tok, mini_batch_size=6, dp_size=4)


def test_two_mini_batches_dp2_matches_per_minibatch_reference():
    """Exact normaliser fields for verl's layout: each mini-batch's gradient equals the
    reference computed on that mini-batch alone."""
    model = TinyPolicy()
    cfg = actor_config()
    spec = ReplayLossSpec(kind="js", coef=0.3)
    fn = make_replay_loss_fn(cfg, spec)
    full = make_batch(n_rows=16, replay_rows=(1, 4, 5, 10, 15), seed=3)
    add_normalizers(full, mini_batch_size=8, dp_size=2)
    rank0, rank1 = tu.chunk_tensordict(full, 2)
    for k in range(2):  # mini-batch k = k-th block of 4 rows on each rank
        parts = [tu.chunk_tensordict(r, 2)[k] for r in (rank0, rank1)]
        mini = tu.concat_tensordict(parts)
        g, _, _ = engine_grads(model, fn, mini, micro=2, dp=2)
        expected = fresh_reference_grad(model, cfg, mini) + replay_reference_grad(model, mini, 0.3)
        assert close(g, expected)


def test_loss_fn_pickles_and_spec_from_config():
    from dyjr_verl.methods.dyjr.config import DyJRConfig

    cfg = actor_config()
    spec = dyjr_loss_spec(DyJRConfig.from_dict({"js": {"coef": 0.05, "normalizer": "joint"}}))
    assert spec.kind == "js" and spec.resolved_coef == 0.05 and spec.resolved_normalizer == "joint"
    fn = pickle.loads(pickle.dumps(make_replay_loss_fn(cfg, spec)))
    assert fn.keywords["spec"] == spec and fn.func is replay_aware_loss
