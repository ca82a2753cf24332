"""Command lines of one run: RLEP's collection, verl's trainer, the evaluation. Pure functions (tested)."""

from __future__ import annotations

import sys
from pathlib import Path

from dyjr_verl.experiments.config import CollectSettings, EvalSettings, Experiment, RunSpec
from dyjr_verl.methods import BASELINE, METHODS

# Each method's own random streams (replay sampling), besides verl's.
METHOD_SEED_KEYS = {BASELINE: (), **{name: m.seed_keys for name, m in METHODS.items()}}


def seed_overrides(method: str, seed: int) -> list[str]:
    """The seed on every stream verl seeds: data shuffle, vLLM sampling, actor mini-batch order and
    engine seed, plus the method's replay sampling."""
    keys = [
        "data.seed",
        "actor_rollout_ref.rollout.seed",
        "actor_rollout_ref.actor.data_loader_seed",
        "actor_rollout_ref.actor.fsdp_config.seed",
        "actor_rollout_ref.ref.fsdp_config.seed",
        *METHOD_SEED_KEYS[method],
    ]
    return [f"{k}={seed}" for k in keys]


def rlep_pool_path(run_dir: Path) -> Path:
    return run_dir / "rlep_pool.parquet"


def trainer_command(exp: Experiment, run: RunSpec, run_dir: Path, recipes: Path) -> list[str]:
    overrides = [
        *exp.shared.overrides(),
        *exp.task_settings.overrides,
        *seed_overrides(run.method, run.seed),
        f"trainer.default_local_dir={run_dir / 'checkpoints'}",
        f"trainer.experiment_name=mini_{run.label}_seed{run.seed}",
        "hydra.run.dir=.",  # the run directory is the cwd; no dated outputs/ tree
        "hydra.output_subdir=null",
    ]
    if run.method == "rlep":
        overrides.append(f"rlep.pool_path={rlep_pool_path(run_dir)}")
    overrides += list(run.extra)  # ablation settings last, so they win
    return main_ppo_command(recipes, run.recipe, overrides)


def main_ppo_command(recipes: Path, recipe: str, overrides: list[str]) -> list[str]:
    """verl's trainer on one of our recipes (every experiment launcher builds its line here)."""
    return [sys.executable, "-m", "verl.trainer.main_ppo", "--config-path", str(recipes), "--config-name", recipe,
            *overrides]


def collect_command(exp: Experiment, run: RunSpec, run_dir: Path, assets: Path) -> list[str]:
    return rlep_collect_command(assets / "tokenizer-model", assets / exp.task / "train.parquet",
                                rlep_pool_path(run_dir), exp.task_settings.reward, exp.collect,
                                exp.shared.max_response_length, run.seed)


def rlep_collect_command(model: Path, data: Path, out: Path, reward: str, c: CollectSettings, max_tokens: int,
                         seed: int) -> list[str]:
    """RLEP's pool collection (phase 1) on ``model``; ``reward`` names a ``dyjr_verl.rewards`` module."""
    return [sys.executable, "-m", "dyjr_verl.methods.rlep.collect", "--model", str(model), "--data", str(data),
            "--out", str(out), "--reward", f"pkg://dyjr_verl.rewards.{reward}",
            "--n", str(c.n), "--temperature", str(c.temperature), "--top-p", str(c.top_p),
            "--max-tokens", str(max_tokens), "--seed", str(seed)]


def checkpoint_dir(run_dir: Path, steps: int) -> Path:
    return run_dir / "checkpoints" / f"global_step_{steps}"


def eval_command(exp: Experiment, run: RunSpec, run_dir: Path, assets: Path) -> list[str]:
    e = exp.eval
    return eval_cli_command(checkpoint_dir(run_dir, exp.shared.steps), f"{exp.task}_{e.split}",
                            assets / exp.task / f"{e.split}.parquet", e, exp.shared.max_response_length, run.seed,
                            run_dir / "eval")


def eval_cli_command(model: Path, name: str, data: Path, e: EvalSettings, max_tokens: int, seed: int, out: Path,
                     limit: int | None = None) -> list[str]:
    """``python -m dyjr_verl.eval`` on one benchmark ``name=data`` (its first ``limit`` questions)."""
    return [sys.executable, "-m", "dyjr_verl.eval", "--model", str(model), "--data", f"{name}={data}",
            "--samples", str(e.samples), "--ks", *[str(k) for k in e.ks], "--temperature", str(e.temperature),
            "--max-tokens", str(max_tokens), "--seed", str(seed), "--rank-k", str(e.rank_k), "--out", str(out),
            *(["--limit", str(limit)] if limit is not None else [])]
