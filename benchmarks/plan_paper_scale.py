"""The per-step plan of every paper-scale recipe at 8 nodes x 8 GPUs (micro-batch 4, 512 prompts x 16
rollouts, mini-batch 64 prompts), as ``python -m dyjr_verl plan`` computes it; writes a markdown table.

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


def _gib(n: int | None) -> str:
    return "unbounded" if n is None else f"{n / 2**30:.2f}"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    import verl  # noqa: F401  the plugin, as main_ppo loads it

    from dyjr_verl.plan import build_plan, compose
    from dyjr_verl.recipes import recipe_names

    with tempfile.TemporaryDirectory() as tmp:
        files = {name: Path(tmp) / f"{name}.parquet" for name in ("train", "test", "pool")}
        for f in files.values():
            f.write_bytes(b"")
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
    table = "\n".join([
        "| recipe | actor dp | fresh rows | replay / mini-batch | replay / step | share (configured) | "
        "optimizer steps | tokens / step (M, max) | store GiB / step / bound | prompt+response / context | "
        "errors / warnings |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
        *rows,
    ])
    text = (f"# Paper-scale plan at 8 x 8 GPUs\n\n`python benchmarks/plan_paper_scale.py` (no GPU needed: "
            f"the plan is computed from the config). Overrides: `{' '.join(SHAPE)}`.\n\n{table}\n")
    if args.out:
        args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
