"""verl's Megatron engine: the two Megatron recipes compose and pass the preflight (FSDP-only
features refused with one line), and the replay loss honours the Megatron engine's loss-function
contract.

The contract (verl 0.9.1, verl/workers/engine/megatron/transformer_impl.py, PP last stage):

* ``MegatronEngine.forward_backward_batch`` sets ``batch_num_tokens`` (sum of ``loss_mask`` over
  the dp group) and ``dp_size`` on the rank's mini-batch, cuts it with the shared
  ``prepare_micro_batches`` and writes ``num_micro_batch`` on every micro-batch;
* ``forward_step`` returns the model output (``log_probs`` and, when asked, ``entropy`` as jagged
  nested tensors over the full sequence, from ``postprocess_thd_engine``) and
  ``partial(postprocess_micro_batch_func, data=micro_batch)``, which megatron-core calls as the
  loss function;
* ``postprocess_micro_batch_func`` calls ``loss_function(model_output=, data=, dp_group=)``,
  expects ``(scalar loss tensor, metrics dict)``, reports ``loss.detach().item()`` and returns
  ``loss * num_micro_batch``, which megatron-core's ``forward_step_calc_loss`` multiplies by the
  CP size and divides by the number of micro-batches before ``backward``; Megatron's DDP then
  averages gradients over the dp(xCP) group;
* ``postprocess_batch_func`` gathers the per-micro-batch outputs.

When megatron-core imports here (``pip install "dyjr-verl[megatron]"``, or megatron-core alone: the
engine module imports on CPU), the tests also drive verl's own ``postprocess_micro_batch_func`` and
megatron-core's own ``forward_step_calc_loss``; the model forward (a GPTModel with vocab-parallel
logits) is the only part replaced, by the toy policy of tests/replay/test_loss.py.
"""

from __future__ import annotations

import functools
import json
import math
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from test_recipes import RECIPES
from test_loss import (
    TinyPolicy,
    add_normalizers,
    close,
    engine_grads,
    fresh_reference_grad,
    make_batch,
    replay_reference_grad,
)
from verl.utils import tensordict_utils as tu
from verl.utils.config import omega_conf_to_dataclass
from verl.workers.engine.utils import detach_tree, postprocess_batch_func, prepare_micro_batches
from verl.workers.utils.losses import ppo_loss

from dyjr_verl.methods.dyjr.config import DyJRConfig
from dyjr_verl.methods.dyjr.divergence import dyjr_loss_spec
from dyjr_verl.replay.terms import ReplayLossSpec, make_replay_loss_fn
from dyjr_verl.preflight import check

MEGATRON_RECIPES = {"grpo_math_megatron": "grpo_math", "dyjr_math_megatron": "dyjr_math"}
# from Qwen/Qwen2.5-Math-7B's config.json
QWEN25_MATH_7B = {"architectures": ["Qwen2ForCausalLM"], "max_position_embeddings": 4096,
                  "num_attention_heads": 28, "num_key_value_heads": 4, "num_hidden_layers": 28}


@pytest.fixture
def cluster_files(tmp_path):
    """Existing data files and a local model directory whose config.json carries Qwen2.5-Math-7B's
    context window (the preflight checks prompt + response against it)."""
    data = tmp_path / "train.parquet"
    data.write_bytes(b"")
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps(QWEN25_MATH_7B))
    return [f"data.train_files={data}", f"data.val_files={data}", f"actor_rollout_ref.model.path={model}"]


def _compose(name: str, overrides: list[str]):
    with initialize_config_dir(config_dir=str(RECIPES), version_base=None):
        return compose(config_name=name, overrides=overrides)


# ----------------------------------------------------------------------------------------------
# recipes
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(MEGATRON_RECIPES))
def test_megatron_recipe_composes_and_passes_the_preflight(name, cluster_files):
    import verl  # noqa: F401  (the plugin registers the trainer modes, as in main_ppo)

    cfg = _compose(name, cluster_files)
    arr = cfg.actor_rollout_ref
    assert cfg.model_engine == "megatron"
    assert arr.actor.strategy == "megatron" and arr.ref.strategy == "megatron"
    mg = arr.actor.megatron
    tp, pp, cp = mg.tensor_model_parallel_size, mg.pipeline_model_parallel_size, mg.context_parallel_size
    gpus = cfg.trainer.n_gpus_per_node * cfg.trainer.nnodes
    # Megatron's splits must divide the GPUs, the KV heads (TP) and the layers (PP)
    assert gpus % (tp * pp * cp) == 0 and gpus // (tp * pp * cp) >= 2
    assert QWEN25_MATH_7B["num_key_value_heads"] % tp == 0 and QWEN25_MATH_7B["num_hidden_layers"] % pp == 0
    assert mg.override_transformer_config.recompute_granularity == "full"
    assert mg.vanilla_mbridge  # mbridge converts the weights: what dyjr-verl[megatron] installs
    assert cfg.diagnostics.rank_k == 0
    if name.startswith("dyjr"):
        assert cfg.trainer.v1.trainer_mode == "dyjr" and cfg.dyjr.js.estimator == "sampled"
    assert check(cfg) == []
    actor = omega_conf_to_dataclass(arr.actor)  # what the trainer hands to the replay loss on Megatron
    assert type(actor).__name__ == "McoreActorConfig" and actor.megatron.tensor_model_parallel_size == tp


@pytest.mark.parametrize("name", sorted(MEGATRON_RECIPES))
def test_megatron_recipe_trains_what_its_fsdp_twin_trains(name, cluster_files):
    """Only the engine differs: data, rollout, loss, optimiser and method settings are the same."""
    mg, fsdp = _compose(name, cluster_files), _compose(MEGATRON_RECIPES[name], cluster_files)
    assert mg.data == fsdp.data
    # the rollout node, less what follows the engine (qat) or the experiment name (trace)
    rollout = [OmegaConf.masked_copy(c.actor_rollout_ref.rollout, [k for k in c.actor_rollout_ref.rollout
                                                                   if k not in ("qat", "trace")]) for c in (mg, fsdp)]
    assert rollout[0] == rollout[1] and rollout[0].n == 8
    assert mg.algorithm == fsdp.algorithm and mg.reward == fsdp.reward
    assert OmegaConf.select(mg, "dyjr") == OmegaConf.select(fsdp, "dyjr")
    assert mg.trainer.v1.trainer_mode == fsdp.trainer.v1.trainer_mode
    a, b = mg.actor_rollout_ref.actor, fsdp.actor_rollout_ref.actor
    for key in ("ppo_mini_batch_size", "use_dynamic_bsz", "ppo_max_token_len_per_gpu", "use_kl_loss", "entropy_coeff",
                "clip_ratio_low", "clip_ratio_high", "loss_agg_mode", "policy_loss", "ppo_epochs", "shuffle"):
        assert a[key] == b[key], key
    for key in ("lr", "weight_decay", "betas", "clip_grad", "lr_warmup_steps", "lr_warmup_steps_ratio"):
        assert a.optim[key] == b.optim[key], key


@pytest.mark.parametrize(
    ("name", "override", "words"),
    [
        ("dyjr_math_megatron", "dyjr.js.estimator=topk", ("dyjr.js.estimator=topk", "megatron")),
        ("dyjr_math_megatron", "diagnostics.rank_k=8", ("diagnostics.rank_k=8", "megatron")),
        ("grpo_math_megatron", "diagnostics.rank_k=8", ("diagnostics.rank_k=8", "megatron")),
    ],
)
def test_fsdp_only_features_are_refused_with_one_line(name, override, words, cluster_files):
    problems = check(_compose(name, [*cluster_files, override]))
    assert len(problems) == 1, problems
    assert all(w in problems[0] for w in words) and "\n" not in problems[0]


@pytest.mark.parametrize(("name", "override"), [("dyjr_math_megatron", "dyjr.js.estimator=topk"),
                                              ("grpo_math_megatron", "diagnostics.rank_k=8")])
def test_main_ppo_refuses_them_before_ray_starts(name, override, cluster_files, tmp_path):
    cmd = [sys.executable, "-m", "verl.trainer.main_ppo", "--config-path", str(RECIPES), "--config-name", name,
           *cluster_files, override]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=tmp_path)
    errors = [ln for ln in out.stderr.splitlines() if ln.startswith("dyjr-verl: error:")]
    assert out.returncode == 2 and len(errors) == 1 and override in errors[0] and "megatron" in errors[0], out.stderr
    assert "Traceback" not in out.stderr


# ----------------------------------------------------------------------------------------------
# the replay loss through the Megatron engine's loss-function convention
# ----------------------------------------------------------------------------------------------


def _replica_postprocess_micro_batch_func(output, data, forward_only, loss_function):
    """MegatronEngineWithLMHead.postprocess_micro_batch_func (verl 0.9.1, transformer_impl.py
    l.1436-1508) with prepare_model_outputs = identity (the LM-head engine), no dynamic CP and
    tf_config.calculate_per_token_loss=False (dense model, CP 1: the recipes' setting)."""
    model_output = output
    loss, metrics = loss_function(model_output=model_output, data=data, dp_group=None)
    scaled_loss = loss * data["num_micro_batch"]  # megatron divides by n_micro_batch in its schedule
    return scaled_loss, {"loss": loss.detach().item(), "metrics": metrics, "model_output": detach_tree(model_output)}


def _replica_forward_step_calc_loss(model, output_tensor, loss_func, config, vp_stage, collect_non_loss_data,
                                    num_microbatches, forward_data_store, cp_group_size, is_last_stage):
    """megatron-core's schedules.forward_step_calc_loss, last stage, 2-tuple (legacy) branch."""
    output_tensor, loss_reduced = loss_func(output_tensor)
    output_tensor = output_tensor * cp_group_size / num_microbatches
    forward_data_store.append(loss_reduced)
    return output_tensor, torch.tensor(0, dtype=torch.int)


def _megatron_importable() -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec("megatron.core") is not None
    except ModuleNotFoundError:
        return False


#: `make install` puts megatron-core (pure Python, no CUDA needed to import) here, outside the venv's
#: site-packages so that no other test imports verl with its Megatron engine loaded
MEGATRON_SITE = Path(os.environ.get("DYJR_MEGATRON_SITE", Path(__file__).resolve().parents[1] / ".venv" / "megatron-site"))


def _verl_megatron_impl():
    """verl's own postprocess_micro_batch_func and megatron-core's own forward_step_calc_loss."""
    from megatron.core.pipeline_parallel.schedules import forward_step_calc_loss
    from verl.workers.engine.megatron import MegatronEngineWithLMHead

    engine = SimpleNamespace(  # the attributes the method reads on the non-DCP, non-per-token path
        prepare_model_outputs=lambda output, data: output,
        get_data_parallel_group=lambda: None,
        engine_config=SimpleNamespace(dynamic_context_parallel=False),
        tf_config=None,
    )
    return functools.partial(MegatronEngineWithLMHead.postprocess_micro_batch_func, engine), forward_step_calc_loss


IMPLS = {"replica": lambda: (_replica_postprocess_micro_batch_func, _replica_forward_step_calc_loss)}
if _megatron_importable():  # else test_verl_engine_cases_with_megatron_core runs them in a subprocess
    IMPLS["verl"] = _verl_megatron_impl


def megatron_grads(impl, model, loss_fn, minibatch, *, dp=1, micro=None, max_tokens=None):
    """One mini-batch through MegatronEngine.forward_backward_batch on ``dp`` ranks (PP 1, CP 1).
    ``micro``: rows per micro-batch; ``max_tokens``: dynamic batch size (the recipes' setting).
    Returns (gradient after Megatron's DDP averaging, per-rank postprocess_batch_func outputs,
    per-rank micro-batch outputs)."""
    postprocess, calc_loss = IMPLS[impl]()
    ranks = tu.chunk_tensordict(minibatch, dp)  # verl's dp dispatch: contiguous chunks
    # forward_backward_batch: loss_mask tokens all-reduced (SUM) over the dp group
    batch_num_tokens = sum(int(r["loss_mask"].values().sum()) for r in ranks)
    rank_grads, batch_outputs, micro_outputs = [], [], []
    for data in ranks:
        model.zero_grad(set_to_none=True)
        # set by the training worker (train_batch's default keys) and the engine
        tu.assign_non_tensor(data, use_dynamic_bsz=max_tokens is not None, global_batch_size=len(minibatch))
        if max_tokens is None:
            tu.assign_non_tensor(data, micro_batch_size_per_gpu=micro)
        else:
            tu.assign_non_tensor(data, max_token_len_per_gpu=max_tokens)
        tu.assign_non_tensor(data, sp_size=1, batch_num_tokens=batch_num_tokens, dp_size=dp)
        micro_batches, indices = prepare_micro_batches(
            data=data, dp_group=None, num_batches_divided_by=None, same_micro_num_in_dp=True, min_num_micro_batch=None
        )
        for mb in micro_batches:
            tu.assign_non_tensor(mb, num_micro_batch=len(micro_batches))
        store = []
        for mb in micro_batches:
            output = model(mb)  # forward_step: full-sequence jagged log_probs (postprocess_thd_engine)
            loss_func = functools.partial(postprocess, data=mb, forward_only=False, loss_function=loss_fn)
            cfg = SimpleNamespace(timers=None, calculate_per_token_loss=False, grad_scale_func=None)
            out, _ = calc_loss(model, output, loss_func, cfg, None, False, len(micro_batches), store,
                               cp_group_size=1, is_last_stage=True)
            assert out.dim() == 0 and out.requires_grad
            out.backward()
        rank_grads.append(torch.cat([p.grad.reshape(-1).clone() for p in model.parameters()]))
        batch_outputs.append(postprocess_batch_func(output_lst=store, indices=indices, data=data))
        micro_outputs.append(store)
    return torch.stack(rank_grads).mean(0), batch_outputs, micro_outputs  # DDP: 1/dp-scaled sum


@pytest.fixture(scope="module")
def megatron_actor_cfg():
    """The McoreActorConfig the trainer builds from dyjr_math_megatron (token-mean, clip 0.2/0.28)."""
    cfg = _compose("dyjr_math_megatron", ["data.train_files=/x/t.parquet", "data.val_files=/x/v.parquet"])
    return cfg, omega_conf_to_dataclass(cfg.actor_rollout_ref.actor)


def _ppo(config):
    return lambda model_output, data, dp_group=None: ppo_loss(config, model_output, data, dp_group)


@pytest.mark.parametrize("impl", sorted(IMPLS))
@pytest.mark.parametrize("split", [{"micro": 1}, {"micro": 4}, {"max_tokens": 12}])
def test_fresh_rows_reproduce_verl_ppo_loss_through_the_megatron_convention(impl, split, megatron_actor_cfg):
    _, actor = megatron_actor_cfg
    model = TinyPolicy()
    td = add_normalizers(make_batch(replay_rows=()), mini_batch_size=8)
    fn = make_replay_loss_fn(actor, dyjr_loss_spec(DyJRConfig.from_dict({"js": {"coef": 0.1}})))
    ours, our_out, our_micro = megatron_grads(impl, model, fn, td.copy(), **split)
    theirs, their_out, _ = megatron_grads(impl, model, _ppo(actor), td.copy(), **split)
    assert torch.equal(ours, theirs) and torch.isfinite(ours).all() and ours.abs().sum() > 0
    assert our_out[0]["loss"] == their_out[0]["loss"]
    assert all(isinstance(x, float) and math.isfinite(x) for x in our_out[0]["loss"])
    assert "actor/pg_loss" in our_out[0]["metrics"] and "replay/rows" in our_out[0]["metrics"]
    rows = our_out[0]["metrics"]["replay/rows"]  # a verl Metric holding one value per micro-batch
    assert len(rows.values) == len(our_micro[0]) and all(float(v) == 0 for v in rows.values)
    # model_output handed back detached, rows in the mini-batch's order after dynamic batching
    lp = our_out[0]["model_output"]["log_probs"]
    assert not lp.requires_grad and len(lp.unbind()) == len(td)
    assert all(torch.equal(a, b) for a, b in zip(lp.unbind(), TinyPolicy()(td)["log_probs"].unbind(), strict=True))
    assert len(our_micro[0]) == len(our_out[0]["loss"])


@pytest.mark.parametrize("impl", sorted(IMPLS))
@pytest.mark.parametrize(("dp", "split"), [(1, {"micro": 1}), (1, {"max_tokens": 12}), (2, {"micro": 2}),
                                           (2, {"max_tokens": 10})])
def test_replay_rows_contribute_lambda_f_js_through_the_megatron_convention(impl, dp, split, megatron_actor_cfg):
    cfg, actor = megatron_actor_cfg
    spec = dyjr_loss_spec(DyJRConfig.from_omegaconf(cfg.dyjr))
    assert spec.kind == "js"  # the sampled estimator: no logits-processor call on Megatron
    coef = spec.resolved_coef
    model = TinyPolicy()
    td = add_normalizers(make_batch(), mini_batch_size=8, dp_size=dp)
    g, outs, micro = megatron_grads(impl, model, make_replay_loss_fn(actor, spec), td, dp=dp, **split)
    # = verl's ppo_loss on the fresh rows alone + lambda * mean f_JS over the replay tokens
    expected = fresh_reference_grad(model, actor, td) + replay_reference_grad(model, td, coef)
    assert close(g, expected)
    assert not close(g, fresh_reference_grad(model, actor, td))  # the replay rows do contribute
    # the FSDP engine's convention (tests/replay/test_loss.py: engine_grads) gives the same update
    fsdp, _, _ = engine_grads(model, make_replay_loss_fn(actor, spec), td, micro=2 if dp == 1 else 1, dp=dp)
    assert close(g, fsdp)
    # what the engine consumes: a float loss per micro-batch and per-micro-batch metric lists
    n_replay = sum(float(v) for o in outs for v in o["metrics"]["replay/rows"].values)
    assert n_replay == 3
    for rank_micro in micro:
        for entry in rank_micro:
            assert isinstance(entry["loss"], float) and isinstance(entry["metrics"], dict)
            assert not entry["model_output"]["log_probs"].requires_grad


def test_verl_engine_cases_with_megatron_core():
    """The contract cases on verl's and megatron-core's own functions, in a process that has
    megatron-core (the ``[megatron]`` extra) on its path."""
    if _megatron_importable():
        return  # they ran in this process (parametrised with impl="verl")
    assert (MEGATRON_SITE / "megatron" / "core").is_dir(), f"no megatron-core at {MEGATRON_SITE}: run `make install`"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(MEGATRON_SITE), os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:warnings", "-p", "no:cacheprovider", __file__, "-k",
         "verl or replica_is", "-m", "not e2e"],
        env=env, capture_output=True, text=True, timeout=900, cwd=Path(__file__).resolve().parents[1],
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-2000:]
    summary = out.stdout.strip().splitlines()[-1]
    assert "skipped" not in summary and int(summary.split(" passed")[0].split()[-1]) >= 7, summary


if _megatron_importable():  # else it runs inside test_verl_engine_cases_with_megatron_core

    def test_the_replica_is_verl_megatron_engine_code(megatron_actor_cfg):
        """The replica convention above gives what verl's and megatron-core's own functions give."""
        impls = {"verl": _verl_megatron_impl(), "replica": IMPLS["replica"]()}
        fn = make_replay_loss_fn(megatron_actor_cfg[1], ReplayLossSpec(kind="js", coef=0.3))
        td = add_normalizers(make_batch(), mini_batch_size=8)
        tokens = int(td["loss_mask"].values().sum())
        tu.assign_non_tensor(td, dp_size=1, batch_num_tokens=tokens, global_batch_size=8, num_micro_batch=3)
        cfg = SimpleNamespace(timers=None, calculate_per_token_loss=False, grad_scale_func=None)
        results = []
        for post, calc in impls.values():
            model, store = TinyPolicy(), []
            loss_func = functools.partial(post, data=td, forward_only=False, loss_function=fn)
            out, _ = calc(model, model(td), loss_func, cfg, None, False, 3, store, cp_group_size=1, is_last_stage=True)
            out.backward()
            results.append((out.detach(), store[0]["loss"], sorted(store[0]["metrics"]), model.emb.grad.clone()))
        (a, la, ka, ga), (b, lb, kb, gb) = results
        assert torch.equal(a, b) and la == lb and ka == kb and torch.equal(ga, gb)
