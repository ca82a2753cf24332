"""The per-step plan of every paper-scale recipe at 8 nodes x 8 GPUs (micro-batch 4, 512 prompts x 16
rollouts, mini-batch 64 prompts), as ``python -m dyjr_verl plan`` computes it, and DyJR's buffer and
top-k record bytes at those shapes (2k / 4k tokens, k = 0 / 8 / 32), with a measured row at the tiny
scale that checks the estimate; writes a markdown file.

    python benchmarks/plan_paper_scale.py --out benchmarks/plan_paper_scale.md
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

SHAPE = [
    "trainer.nnodes=8", "trainer.n_gpus_per_node=8", "data.train_batch_size=512", "actor_rollout_ref.rollout.n=16",
    "actor_rollout_ref.actor.ppo_mini_batch_size=64", "actor_rollout_ref.actor.use_dynamic_bsz=false",
    "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=4",
    "actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu=4",
]
RECIPES = ("grpo_math", "dyjr_math", "rlep_math", "exgrpo_math", "grpo_math_megatron", "dyjr_math_megatron",
           "grpo_sql", "dyjr_sql")
#: the memory table: dyjr_math (prompt 1024) at 2k and 4k tokens per trajectory, k = 0 (sampled) / 8 / 32
MEMORY_RESPONSE_LENGTHS = (1024, 3072)
MEMORY_KS = (0, 8, 32)


def _gib(n: int | None) -> str:
    return "unbounded" if n is None else f"{n / 2**30:.2f}"


def recipe_table(files: dict[str, Path]) -> str:
    from dyjr_verl.plan import build_plan, compose
    from dyjr_verl.recipes import recipe_names

    rows = []
    for name in [r for r in RECIPES if r in recipe_names()]:
        data = [f"data.train_files={files['train']}", f"data.val_files={files['test']}"]
        if name.startswith("rlep"):
            data.append(f"rlep.pool_path={files['pool']}")
        plan = build_plan(compose(name, data + SHAPE))
        rows.append(
            f"| `{name}` | {plan.actor_dp} | {plan.fresh_rows_per_step} | {plan.replay_rows_per_minibatch} | "
            f"{plan.replay_rows_per_step} | {plan.replay_share:.3f} ({plan.replay_share_configured:.3f}) | "
            f"{plan.optimizer_steps_per_step} | {plan.tokens_per_step_max / 1e6:.1f} | "
            f"{_gib(plan.buffer_bytes_per_step)} / {_gib(plan.buffer_bytes_max)} | "
            f"{plan.max_prompt_length}+{plan.max_response_length} / {plan.model_context} | "
            f"{len(plan.errors)} / {len(plan.warnings)} |"
        )
    return "\n".join([
        "| recipe | actor dp | fresh rows | replay / mini-batch | replay / step | share (configured) | "
        "optimizer steps | tokens / step (M, max) | store GiB / step / bound | prompt+response / context | "
        "errors / warnings |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
        *rows,
    ])


def memory_table(files: dict[str, Path]) -> str:
    """DyJR's bytes per step and per stored step from ``build_plan`` (the code ``plan`` runs)."""
    from dyjr_verl.plan import build_plan, compose, stored_row_bytes

    rows = []
    for response in MEMORY_RESPONSE_LENGTHS:
        for k in MEMORY_KS:
            estimator = ["dyjr.js.estimator=sampled"] if k == 0 else ["dyjr.js.estimator=topk", f"dyjr.js.topk_k={k}"]
            plan = build_plan(compose("dyjr_math", [
                f"data.train_files={files['train']}", f"data.val_files={files['test']}",
                f"data.max_response_length={response}", *estimator, *SHAPE]))
            tokens = plan.max_prompt_length + plan.max_response_length
            row = stored_row_bytes(plan.max_prompt_length, plan.max_response_length, k)
            rows.append(
                f"| {tokens} | {k} | {row / 1024:.1f} | {_gib(plan.buffer_bytes_per_step)} | "
                f"{_gib(plan.topk_record_bytes_per_step)} | {plan.buffer_capacity} | {_gib(plan.buffer_bytes_max)} | "
                f"{_gib(plan.topk_probe_bytes_per_step)} | {_gib(plan.topk_replay_bytes_per_step)} |"
            )
    return "\n".join([
        "| tokens (1024 + response) | k | KiB / stored row | GiB / stored step | of which record | capacity (rows) | "
        "GiB buffer bound | GiB probe output / step | GiB record on replayed rows / step |",
        "|---|---|---|---|---|---|---|---|---|",
        *rows,
    ])


def measure_tiny_store(k: int, *, prompts: int = 8, n: int = 4, vocab: int = 512, seed: int = 0) -> dict[str, int]:
    """One step at the tiny scale through the real pieces, no trainer: the old-log-prob probe's
    record outputs (as verl hands them back), :func:`take_record`, the compact trajectories and the
    buffer. Returns the buffer's measured bytes and the ``plan`` estimate at the rows' own lengths."""
    import torch
    from verl.utils import tensordict_utils as tu

    from dyjr_verl.diagnostics.probe import probe_logits
    from dyjr_verl.diagnostics.topk_record import TOPK_RECORD_FLAG
    from dyjr_verl.methods.dyjr.buffer import TimeSensitiveBuffer
    from dyjr_verl.methods.dyjr.config import BufferConfig
    from dyjr_verl.methods.dyjr.topk import take_record
    from dyjr_verl.plan import stored_row_bytes
    from dyjr_verl.replay.rows import Trajectory

    gen = torch.Generator().manual_seed(seed)
    rows = prompts * n
    p_len = torch.randint(8, 33, (rows,), generator=gen).tolist()  # as the tiny recipes: <= 32 + 64 tokens
    r_len = torch.randint(4, 65, (rows,), generator=gen).tolist()

    def jag(parts):
        return torch.nested.as_nested_tensor(list(parts), layout=torch.jagged)

    prompt_ids = [torch.randint(0, vocab, (p,), generator=gen) for p in p_len]
    response_ids = [torch.randint(0, vocab, (r,), generator=gen) for r in r_len]
    data = tu.get_tensordict({
        "prompts": jag(prompt_ids), "responses": jag(response_ids),
        "input_ids": jag(torch.cat([p, r]) for p, r in zip(prompt_ids, response_ids)),
        "response_mask": jag(torch.ones(r, dtype=torch.int64) for r in r_len),
    })
    records = None
    if k:
        tu.assign_non_tensor(data, **{TOPK_RECORD_FLAG: k})
        logits = torch.randn(sum(p_len) + sum(r_len), vocab, generator=gen, dtype=torch.bfloat16)
        cu = data["input_ids"].offsets()
        for key, value in probe_logits(logits[None], data).items():
            data[key] = torch.nested.nested_tensor_from_jagged(value.squeeze(0), cu)
        records = take_record(data, k)
    columns = zip(data["prompts"].unbind(0), data["responses"].unbind(0), data["response_mask"].unbind(0), strict=True)
    trajectories = [  # as store_fresh_rows builds them: views of the step's tensors, copied by Trajectory
        Trajectory(prompt_ids=prompt, response_ids=response, response_mask=mask,
                   logprobs=-torch.rand(r_len[i], generator=gen), reward=1.0, uid=f"g{i // n}", step=1,
                   record=None if records is None else records[i])
        for i, (prompt, response, mask) in enumerate(columns)
    ]
    buffer = TimeSensitiveBuffer(BufferConfig(admit="all"), rows_per_step=rows)
    buffer.push(1, trajectories)
    return {"rows": rows, "tokens": sum(p_len) + sum(r_len), "measured": buffer.nbytes(),
            "estimated": sum(stored_row_bytes(p, r, k) for p, r in zip(p_len, r_len))}


def tiny_table() -> str:
    lines = ["| k | rows | tokens | measured bytes | plan estimate | measured / estimate |",
             "|---|---|---|---|---|---|"]
    for k in MEMORY_KS:
        m = measure_tiny_store(k)
        lines.append(f"| {k} | {m['rows']} | {m['tokens']} | {m['measured']:,} | {m['estimated']:,} | "
                     f"{m['measured'] / m['estimated']:.3f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    import verl  # noqa: F401  the plugin, as main_ppo loads it

    with tempfile.TemporaryDirectory() as tmp:
        files = {name: Path(tmp) / f"{name}.parquet" for name in ("train", "test", "pool")}
        for f in files.values():
            f.write_bytes(b"")
        recipes, memory = recipe_table(files), memory_table(files)
    text = (
        f"# Paper-scale plan at 8 x 8 GPUs\n\n`python benchmarks/plan_paper_scale.py` (no GPU needed: "
        f"the plan is computed from the config). Overrides: `{' '.join(SHAPE)}`.\n\n{recipes}\n\n"
        "## DyJR buffer and top-k record bytes\n\n"
        "`dyjr_math` at the shape above (512 prompts x 16 rollouts = 8192 trajectories per step), prompt 1024 + "
        "response 1024 / 3072 tokens, k = 0 (`dyjr.js.estimator=sampled`: no record) / 8 / 32 "
        "(`estimator=topk`, `topk_k=k`), every row at the maximum length and every rollout admitted (upper "
        "bounds; `admit=correct` keeps the solved share). Columns, all from `dyjr_verl.plan.build_plan`: a "
        "stored row (the compact trajectory: int64 prompt + response ids and mask, fp32 log-probs, and the "
        "top-k record at the response length, `6k + 2` bytes per token); one stored step (what one step adds "
        "to the buffer, host memory) and its record part; `dyjr.buffer.capacity` (null: `max_age` x the "
        "rollouts of one step) and the buffer bound it gives; the probe's record outputs of one step "
        "through TransferQueue (every packed position of every row: verl's logits-processor contract); the "
        "records written back on the step's replayed rows (fresh rows carry an empty record).\n\n"
        f"{memory}\n\n"
        "### Measured at the tiny scale\n\n"
        "`measure_tiny_store` in this script: 8 prompts x 4 rollouts, prompt 8-32 and response 4-64 tokens, "
        "V = 512, through the real probe (`probe_logits`), `take_record` and `TimeSensitiveBuffer.push`; "
        "measured = `TimeSensitiveBuffer.nbytes()` (the stored arrays and the records' whole tensor "
        "storages), estimate = `stored_row_bytes` at each row's lengths. Equal bytes: the estimate is exact "
        "for the arrays and records (Python object overhead, ~1 KiB a row, is not counted by either).\n\n"
        f"{tiny_table()}\n"
    )
    if args.out:
        args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
