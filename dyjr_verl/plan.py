"""``python -m dyjr_verl plan --config-name RECIPE [hydra overrides…] [--json]``: what one training
step of a recipe will do on a cluster shape, before anything starts.

The recipe is composed as ``main_ppo`` composes it (same recipes directory, same overrides) and
checked by the same start-up check (:func:`build_plan` is what the hydra callback in every recipe
runs, so ``main_ppo`` refuses exactly what ``plan`` reports as an error). No Ray, no weights: the
per-step numbers come from the config alone, with the replay placement the trainers use
(:mod:`dyjr_verl.replay.layout`). Byte counts are estimates at full prompt + response length.

    python -m dyjr_verl plan --config-name dyjr_math data.train_files=t.parquet data.val_files=v.parquet \\
        trainer.nnodes=8 trainer.n_gpus_per_node=8 --json
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from dyjr_verl.replay.layout import (
    UpdateShape, forward_row_multiple, place_replay_rows, plan_minibatches, training_micro_batch,
)

EXIT_CODE = 2

# Bytes per token of a stored trajectory, the replay core's compact copy (replay.rows.Trajectory):
# prompt ids (int64, as verl holds them) over the prompt; response ids and response mask (int64) and
# the recorded log-prob (fp32) over the response. Python object overhead (~1 KiB a row) is left out.
_PROMPT_TOKEN_BYTES = 8
_RESPONSE_TOKEN_BYTES = 8 + 8 + 4


def record_bytes_per_token(record_k: int) -> int:
    """A top-k record's bytes per position (``6k + 2``: int32 ids, bf16 log-probs and rest); 0 for k = 0."""
    from dyjr_verl.diagnostics.topk_record import topk_record_bytes_per_token

    return topk_record_bytes_per_token(record_k) if record_k else 0


def stored_row_bytes(prompt_len: int, response_len: int, record_k: int = 0) -> int:
    """Bytes of one stored trajectory (tokens, mask, log-probs and, for ``record_k`` > 0, its top-k
    record, stored at the response length: jagged)."""
    return prompt_len * _PROMPT_TOKEN_BYTES + response_len * (_RESPONSE_TOKEN_BYTES + record_bytes_per_token(record_k))


@dataclass
class Plan:
    """One training step of a composed recipe (``--json`` prints :meth:`to_dict`)."""

    trainer_mode: str
    method: str
    nnodes: int
    gpus_per_node: int
    actor_dp: int
    micro_batch_rows: int  # per GPU; 1 = token-sized micro-batches (use_dynamic_bsz)
    fresh_rows_per_step: int = 0
    minibatch_rows: int = 0
    optimizer_steps_per_step: int = 0
    replay_rows_per_step: int = 0
    replay_rows_per_minibatch: int = 0
    replay_share_configured: float = 0.0
    replay_share: float = 0.0
    max_prompt_length: int = 0
    max_response_length: int = 0
    model_context: int | None = None
    model_context_source: str = ""
    tokens_per_step_max: int = 0
    buffer_bytes_per_step: int = 0  # what one step adds to the method's store = one stored step (upper bound)
    buffer_bytes_max: int | None = 0  # the store's bound (None: grows with training; 0: no store)
    buffer_capacity: int | None = None  # rows (DyJR: dyjr.buffer.capacity, or derived from max_age when null)
    topk_record_bytes_per_step: int = 0  # of buffer_bytes_per_step: the admitted rows' top-k records
    topk_probe_bytes_per_step: int = 0  # the old-log-prob probe's record outputs through TransferQueue
    topk_replay_bytes_per_step: int = 0  # the records written back on the step's replayed rows
    notes: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _sel(config: DictConfig, key: str, default: Any = None) -> Any:
    return OmegaConf.select(config, key, default=default)


def rollouts_per_step(config: Any) -> int | None:
    """Trajectories one step generates (``data.train_batch_size`` x ``rollout.n``; verl's no-op
    padding rows are never admitted to a store); None for a config without a batch size."""
    prompts = _sel(config, "data.train_batch_size")
    return None if prompts is None else int(prompts) * int(_sel(config, "actor_rollout_ref.rollout.n", 1) or 1)


def actor_dp(config: DictConfig) -> int:
    """Data-parallel ranks of the actor: world size over the model-parallel sizes of its engine."""
    world = int(_sel(config, "trainer.nnodes", 1)) * int(_sel(config, "trainer.n_gpus_per_node", 1))
    actor = "actor_rollout_ref.actor"
    if str(_sel(config, f"{actor}.strategy", "fsdp")) == "megatron":
        split = 1
        for key in ("tensor_model_parallel_size", "pipeline_model_parallel_size", "context_parallel_size"):
            split *= int(_sel(config, f"{actor}.megatron.{key}", 1) or 1)
    else:
        split = int(_sel(config, f"{actor}.ulysses_sequence_parallel_size", 1) or 1)
    return max(1, world // split)


def _method(mode: str) -> str:
    from dyjr_verl.methods import BASELINE, method_for_mode

    method = method_for_mode(mode)
    return BASELINE if method is None else method.name


def build_plan(config: DictConfig) -> Plan:
    """The plan of one step of ``config``; ``errors`` is what the start-up check refuses."""
    from dyjr_verl import preflight

    mode = preflight.trainer_mode(config)
    dynamic = bool(_sel(config, "actor_rollout_ref.actor.use_dynamic_bsz", False))
    micro = training_micro_batch(_sel(config, "actor_rollout_ref.actor"), actor_dp(config))
    plan = Plan(
        trainer_mode=mode, method=_method(mode), nnodes=int(_sel(config, "trainer.nnodes", 1)),
        gpus_per_node=int(_sel(config, "trainer.n_gpus_per_node", 1)), actor_dp=actor_dp(config),
        micro_batch_rows=micro,
    )
    context = preflight.model_context(config)  # read once (a config.json or the HF cache)
    plan.model_context, plan.model_context_source = context
    plan.errors = preflight.check(config, context)
    plan.warnings = preflight.config_warnings(config, context)
    try:
        _fill_numbers(plan, config, dynamic)
    except Exception as exc:  # a config the numbers cannot be read from: the check says why
        if not plan.errors:
            plan.errors.append(f"cannot plan this config: {type(exc).__name__}: {exc}")
    return plan


def _fill_numbers(plan: Plan, config: DictConfig, dynamic: bool) -> None:
    n = int(_sel(config, "actor_rollout_ref.rollout.n", 1))
    prompts = int(_sel(config, "data.train_batch_size"))
    plan.max_prompt_length = int(_sel(config, "data.max_prompt_length", 0))
    plan.max_response_length = int(_sel(config, "data.max_response_length", 0))
    seq = plan.max_prompt_length + plan.max_response_length
    plan.minibatch_rows = int(_sel(config, "actor_rollout_ref.actor.ppo_mini_batch_size")) * n
    # verl's v1 trainer pads the batch with no-op rows to a multiple of lcm(dp, mini-batch rows)
    multiple = math.lcm(plan.actor_dp, max(1, plan.minibatch_rows))
    plan.fresh_rows_per_step = multiple * math.ceil(prompts * n / multiple)
    if plan.fresh_rows_per_step != prompts * n:
        plan.warnings.append(f"verl pads {prompts * n} rows per step to {plan.fresh_rows_per_step} (a multiple of "
                             f"lcm(dp, mini-batch rows) = {multiple}) with no-op rows")
    epochs = int(_sel(config, "actor_rollout_ref.actor.ppo_epochs", 1) or 1)
    if not dynamic and plan.micro_batch_rows < 1:
        plan.errors.append("actor.ppo_micro_batch_size_per_gpu (or the deprecated ppo_micro_batch_size) is not set "
                           "and actor.use_dynamic_bsz is false")
        return
    shape = UpdateShape(plan.fresh_rows_per_step, plan.minibatch_rows, plan.actor_dp, plan.micro_batch_rows)
    shape_problems = shape.problems()
    plan.errors.extend(shape_problems)
    plan.optimizer_steps_per_step = shape.num_minibatches * epochs
    row_bytes = stored_row_bytes(plan.max_prompt_length, plan.max_response_length)
    if plan.method in _METHOD_PLANS and not shape_problems and _sel(config, f"{plan.method}.enable", True):
        _METHOD_PLANS[plan.method](plan, config, shape, row_bytes, epochs)
    plan.tokens_per_step_max = (plan.fresh_rows_per_step + plan.replay_rows_per_step) * seq


def _node(plan: Plan, config: DictConfig) -> Any:
    from dyjr_verl.methods import METHODS
    from dyjr_verl.replay.config import ConfigError

    try:
        return METHODS[plan.method].parse(_sel(config, plan.method))
    except ConfigError:
        return None  # its errors are already in plan.errors (the start-up check parsed it too)


def _dyjr(plan: Plan, config: DictConfig, shape: UpdateShape, row_bytes: int, epochs: int) -> None:
    from dyjr_verl.methods.dyjr.config import resolved_capacity

    cfg = _node(plan, config)
    if cfg is None:
        return
    target = cfg.replay.num_rows(plan.fresh_rows_per_step)
    placement = place_replay_rows(target, shape)
    errors, warnings = placement.problems()
    plan.errors.extend(errors)
    plan.warnings.extend(warnings)
    plan.replay_rows_per_step, plan.replay_rows_per_minibatch = placement.rows, placement.per_minibatch
    plan.replay_share_configured, plan.replay_share = target / plan.fresh_rows_per_step, placement.share
    record_k = int(cfg.js.topk_k) if cfg.js.estimator == "topk" else 0
    row_bytes = stored_row_bytes(plan.max_prompt_length, plan.max_response_length, record_k)  # with the record
    rows = rollouts_per_step(config)
    # every rollout may be admitted (admit=all; `correct` admits the solved share of them)
    plan.buffer_bytes_per_step = rows * row_bytes
    plan.buffer_capacity = resolved_capacity(cfg.buffer, rows)
    alive_steps = 1 if cfg.buffer.frozen else cfg.buffer.max_age + 1  # frozen: the first step's fill only
    plan.buffer_bytes_max = min(plan.buffer_capacity, rows * alive_steps) * row_bytes
    if cfg.buffer.capacity is None:
        plan.notes.append(f"dyjr.buffer.capacity=null: {plan.buffer_capacity} rows = "
                          f"{1 if cfg.buffer.frozen else cfg.buffer.max_age} x {rows} rollouts per step")
    if cfg.buffer.frozen:
        plan.notes.append("dyjr.buffer.frozen: the buffer is filled at the first step only and never refreshed "
                          "or evicted (a static reference)")
        if cfg.buffer.max_age != type(cfg.buffer)().max_age:
            plan.warnings.append(f"dyjr.buffer.max_age={cfg.buffer.max_age} is not used with dyjr.buffer.frozen=true "
                                 "(nothing is evicted by age)")
    elif plan.buffer_capacity < rows * cfg.buffer.max_age:
        plan.warnings.append(
            f"dyjr.buffer.capacity={plan.buffer_capacity} holds {plan.buffer_capacity / rows:.2g} "
            f"steps of admissions at most ({rows} rollouts per step), so dyjr.buffer.max_age={cfg.buffer.max_age} "
            "may never bind (overflow evicts from the oldest step); capacity=null derives it from max_age")
    if record_k:
        per_token = record_bytes_per_token(record_k)
        plan.topk_record_bytes_per_step = rows * plan.max_response_length * per_token
        # verl's processor outputs are per packed position: every row, prompt positions included
        plan.topk_probe_bytes_per_step = (plan.fresh_rows_per_step * (plan.max_prompt_length + plan.max_response_length)
                                          * per_token)
        plan.topk_replay_bytes_per_step = plan.replay_rows_per_step * plan.max_response_length * per_token
    if cfg.replay.as_pg:
        plan.notes.append(f"dyjr.replay.as_pg: replay rows get lambda={cfg.js.coef:g} x the clipped PG term with their "
                          "stored advantage (no divergence); no optimizer steps added")
        return
    term = "JS" if cfg.js.divergence == "js" else "forward KL"
    plan.notes.append(f"replay rows get only lambda={cfg.js.coef:g} x {term} ({cfg.js.estimator} estimator); "
                      "no optimizer steps added")


def _rlep(plan: Plan, config: DictConfig, shape: UpdateShape, row_bytes: int, epochs: int) -> None:
    from verl.trainer.ppo.utils import need_reference_policy

    cfg = _node(plan, config)
    if cfg is None:
        return
    prompts = plan.fresh_rows_per_step // max(1, int(_sel(config, "actor_rollout_ref.rollout.n", 1)))
    replay = prompts * cfg.replay_per_group  # at most: questions missing from the pool get none
    steps, rows = plan_minibatches(
        plan.fresh_rows_per_step, plan.fresh_rows_per_step + replay, rows_per_minibatch=shape.minibatch_rows,
        row_multiple=shape.row_multiple, keep_minibatch_rows=True,
        batch_multiple=forward_row_multiple(config, shape.dp, use_reference=need_reference_policy(config)),
    )
    plan.optimizer_steps_per_step = steps * epochs
    plan.replay_rows_per_step, plan.replay_rows_per_minibatch = replay, math.ceil(replay / steps)
    plan.replay_share_configured = plan.replay_share = replay / plan.fresh_rows_per_step
    pool = Path(str(cfg.pool_path or "")).expanduser()
    plan.buffer_bytes_max = pool.stat().st_size if pool.is_file() else None  # the pool file, read once
    plan.notes.append(f"up to {cfg.replay_per_group} stored answers join each group; they add optimizer steps as "
                      f"mini-batches of {shape.minibatch_rows} rows would: {steps} steps of {rows} rows (with padding)")


def _exgrpo(plan: Plan, config: DictConfig, shape: UpdateShape, row_bytes: int, epochs: int) -> None:
    cfg = _node(plan, config)
    if cfg is None:
        return
    prompts = plan.fresh_rows_per_step // max(1, int(_sel(config, "actor_rollout_ref.rollout.n", 1)))
    questions = cfg.num_experience_questions(prompts)
    if cfg.replay.size and questions == 0:
        plan.errors.append(f"exgrpo.replay.size={cfg.replay.size} of data.train_batch_size={prompts} rounds to 0 "
                           "experience questions per step: raise it or the batch size")
    plan.replay_rows_per_step = questions  # one replayed trajectory next to K - 1 fresh rollouts
    plan.replay_rows_per_minibatch = math.ceil(questions / max(1, shape.num_minibatches))
    plan.replay_share_configured = plan.replay_share = questions / plan.fresh_rows_per_step
    plan.buffer_bytes_per_step = plan.fresh_rows_per_step * row_bytes  # correct rollouts of partly solved groups
    plan.buffer_bytes_max = None
    plan.notes.append(f"once fresh accuracy > {cfg.start_accuracy:g}: {questions} of {prompts} questions per step "
                      "come from the pool (K-1 fresh + 1 replayed); the pool is not bounded")


#: each method's numbers (names from dyjr_verl.methods.METHODS)
_METHOD_PLANS = {"dyjr": _dyjr, "rlep": _rlep, "exgrpo": _exgrpo}


# ------------------------------------------------------------------------------------------------
# CLI
# ------------------------------------------------------------------------------------------------


def compose(config_name: str, overrides: list[str], config_dir: str | None = None) -> DictConfig:
    """The recipe as ``main_ppo --config-path DIR --config-name NAME overrides…`` composes it."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from dyjr_verl.recipes import recipes_dir

    with initialize_config_dir(config_dir=str(config_dir or recipes_dir()), version_base=None):
        return hydra_compose(config_name=config_name, overrides=overrides)


def _bytes(n: int | None) -> str:
    if n is None:
        return "unbounded"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def render(plan: Plan, name: str) -> str:
    ctx = (f"{plan.model_context} ({plan.model_context_source})" if plan.model_context
           else f"unknown ({plan.model_context_source})")
    lines = [
        f"plan: {name}  trainer_mode={plan.trainer_mode}  method={plan.method}",
        f"  cluster               {plan.nnodes} nodes x {plan.gpus_per_node} GPUs, actor dp {plan.actor_dp}, "
        f"micro-batch {plan.micro_batch_rows if plan.micro_batch_rows > 1 else 'by tokens'}",
        f"  fresh rows / step     {plan.fresh_rows_per_step} (mini-batch {plan.minibatch_rows} rows)",
        f"  optimizer steps       {plan.optimizer_steps_per_step}",
        f"  replay rows           {plan.replay_rows_per_step} / step, {plan.replay_rows_per_minibatch} / mini-batch",
        f"  replay share          {plan.replay_share:.4f} (configured {plan.replay_share_configured:.4f})",
        f"  lengths               prompt {plan.max_prompt_length} + response {plan.max_response_length} "
        f"= {plan.max_prompt_length + plan.max_response_length}; context {ctx}",
        f"  tokens / step (max)   {plan.tokens_per_step_max:,}",
        f"  store / step (max)    {_bytes(plan.buffer_bytes_per_step)}; store bound {_bytes(plan.buffer_bytes_max)}"
        + (f" ({plan.buffer_capacity} rows)" if plan.buffer_capacity is not None else ""),
        f"  top-k record / step   stored {_bytes(plan.topk_record_bytes_per_step)}; probe output "
        f"{_bytes(plan.topk_probe_bytes_per_step)}; on replayed rows {_bytes(plan.topk_replay_bytes_per_step)}",
    ]
    lines += [f"  note: {n}" for n in plan.notes]
    lines += [f"dyjr-verl: warning: {w}" for w in plan.warnings]
    lines += [f"dyjr-verl: error: {e}" for e in plan.errors]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m dyjr_verl plan",
        description="Per-step plan of a recipe on a cluster shape (no Ray, no weights). Exit 2 on an error.",
        epilog="example: python -m dyjr_verl plan --config-name dyjr_math data.train_files=t.parquet "
               "data.val_files=v.parquet trainer.nnodes=8 --json",
    )
    parser.add_argument("--config-name", required=True, help="recipe name (python -m dyjr_verl recipes lists the dir)")
    parser.add_argument("--config-path", default=None, help="recipes directory (default: the shipped one)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("overrides", nargs="*", help="hydra overrides, as for main_ppo")
    args = parser.parse_args(argv)
    try:
        import verl  # noqa: F401  loads the dyjr_verl plugin exactly as main_ppo does

        config = compose(args.config_name, args.overrides, args.config_path)
    except Exception as exc:  # unknown recipe, bad override: hydra's message, one line
        print(f"dyjr-verl: error: cannot compose {args.config_name}: {str(exc).splitlines()[0]}", file=sys.stderr)
        return EXIT_CODE
    plan = build_plan(config)
    print(json.dumps(plan.to_dict()) if args.json else render(plan, args.config_name))
    return EXIT_CODE if plan.errors else 0
