"""Command lines of one run: RLEP's collection, verl's trainer, the evaluation. Pure functions (tested)."""

from __future__ import annotations

import sys
from pathlib import Path

from dyjr_verl.experiments.config import Experiment, RunSpec

# Each method's own random streams (replay sampling), besides verl's.
METHOD_SEED_KEYS = {
    "grpo": (),
    "dyjr": ("dyjr.replay.seed",),
    "rlep": ("rlep.seed",),
    "exgrpo": ("exgrpo.replay.seed",),
}


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
    return [sys.executable, "-m", "verl.trainer.main_ppo", "--config-path", str(recipes),
            "--config-name", run.recipe, *overrides]


def collect_command(exp: Experiment, run: RunSpec, run_dir: Path, assets: Path) -> list[str]:
    c = exp.collect
    return [sys.executable, "-m", "dyjr_verl.baselines.rlep_collect", "--model", str(assets / "tokenizer-model"),
            "--data", str(assets / exp.task / "train.parquet"), "--out", str(rlep_pool_path(run_dir)),
            "--reward", f"pkg://dyjr_verl.rewards.{exp.task_settings.reward}",
            "--n", str(c.n), "--temperature", str(c.temperature), "--top-p", str(c.top_p),
            "--max-tokens", str(exp.shared.max_response_length), "--seed", str(run.seed)]


def checkpoint_dir(run_dir: Path, steps: int) -> Path:
    return run_dir / "checkpoints" / f"global_step_{steps}"


def eval_command(exp: Experiment, run: RunSpec, run_dir: Path, assets: Path) -> list[str]:
    e = exp.eval
    return [sys.executable, "-m", "dyjr_verl.eval", "--model", str(checkpoint_dir(run_dir, exp.shared.steps)),
            "--data", f"{exp.task}_{e.split}={assets / exp.task / f'{e.split}.parquet'}", "--samples", str(e.samples),
            "--ks", *[str(k) for k in e.ks], "--temperature", str(e.temperature),
            "--max-tokens", str(exp.shared.max_response_length), "--seed", str(run.seed),
            "--rank-k", str(e.rank_k), "--out", str(run_dir / "eval")]
