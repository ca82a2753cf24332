"""Which Hugging Face weights ``--model`` means: an HF directory, or a verl checkpoint merged with
verl's own model merger.

verl's FSDP checkpoint manager always writes ``actor/huggingface`` with the config and tokenizer, but
the weights only with ``actor_rollout_ref.actor.checkpoint.save_contents`` containing ``hf_model``;
the model itself is in ``actor/model_world_size_W_rank_R.pt`` (plus ``fsdp_config.json``). Those
shards are merged by :class:`verl.model_merger.fsdp_model_merger.FSDPModelMerger` (the same code as
``python -m verl.model_merger merge --backend fsdp``) into a cache directory, written to a temporary
sibling first so an interrupted merge is never mistaken for a finished one. A stamp of the shard
files (name, size, mtime) makes a later run re-use the merge only while the shards are unchanged.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

__all__ = ["CheckpointError", "resolve_model"]

STAMP = "merged_from.json"


class CheckpointError(ValueError):
    """``--model`` names nothing vLLM can load: reported as one ``error:`` line, exit code 2."""


def _weights_problem(model_dir: Path) -> str | None:
    """Why ``model_dir`` is not a complete HF model (verl's own check of a merger output), or None."""
    from verl.model_merger.output_validation import validate_hf_model_output

    try:
        validate_hf_model_output(model_dir)
    except RuntimeError as exc:
        return str(exc).split(": ", 1)[-1]
    return None


def _actor_dir(path: Path) -> Path:
    return path / "actor" if (path / "actor").is_dir() else path


def _shard_stamp(actor: Path) -> dict:
    shards = sorted(actor.glob("model_world_size_*_rank_*.pt"))
    return {"source": str(actor.resolve()),
            "shards": [[p.name, p.stat().st_size, p.stat().st_mtime_ns] for p in shards]}


def _check_fsdp_shards(actor: Path) -> None:
    config = actor / "fsdp_config.json"
    try:
        world_size = int(json.loads(config.read_text())["world_size"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"unreadable {config.name} ({exc})") from None
    missing = [r for r in range(world_size) if not (actor / f"model_world_size_{world_size}_rank_{r}.pt").is_file()]
    if missing:
        raise CheckpointError(f"world_size {world_size} but the model shards of ranks {missing} are missing")
    if not (actor / "huggingface" / "config.json").is_file():
        raise CheckpointError("FSDP shards but no huggingface/config.json (verl's merger needs the config)")


def merge_fsdp(actor: Path, target: Path) -> Path:
    """Merge ``actor``'s FSDP shards into ``target`` with verl's model merger (re-used when current)."""
    stamp = _shard_stamp(actor)
    try:
        current = json.loads((target / STAMP).read_text()) == stamp
    except (OSError, ValueError):
        current = False
    if current and not _weights_problem(target):
        print(f"eval: re-using the merged model in {target}")
        return target
    from verl.model_merger.base_model_merger import ModelMergerConfig
    from verl.model_merger.fsdp_model_merger import FSDPModelMerger

    partial = target.with_name(target.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    print(f"eval: merging the FSDP shards of {actor} with verl.model_merger into {target}")
    config = ModelMergerConfig(operation="merge", backend="fsdp", local_dir=str(actor), target_dir=str(partial),
                               hf_model_config_path=str(actor / "huggingface"))
    try:
        merger = FSDPModelMerger(config)
        merger.merge_and_save()
        merger.cleanup()
    except Exception as exc:  # noqa: BLE001 - a damaged checkpoint: one line, not the merger's traceback
        shutil.rmtree(partial, ignore_errors=True)
        reason = " ".join(str(exc).split())  # one line, whatever the merger raised
        raise CheckpointError(f"verl.model_merger could not merge the FSDP shards: "
                              f"{type(exc).__name__}: {reason}") from None
    (partial / STAMP).write_text(json.dumps(stamp))
    shutil.rmtree(target, ignore_errors=True)
    partial.rename(target)
    return target


def resolve_model(path: Path, merged_dir: Path) -> Path:
    """The HF directory to evaluate for ``--model path`` (merging into ``merged_dir`` if needed)."""
    if not path.is_dir():
        raise CheckpointError(f"--model {path}: no such directory")
    if (path / "config.json").is_file():  # a Hugging Face directory
        problem = _weights_problem(path)
        if problem:
            raise CheckpointError(f"--model {path}: config.json but {problem}")
        return path
    actor = _actor_dir(path)
    hf = actor / "huggingface"
    if (hf / "config.json").is_file() and not _weights_problem(hf):
        return hf
    if (actor / "fsdp_config.json").is_file() or any(actor.glob("model_world_size_*_rank_*.pt")):
        try:
            _check_fsdp_shards(actor)
            return merge_fsdp(actor, merged_dir)
        except CheckpointError as exc:
            raise CheckpointError(f"--model {path}: {exc}") from None
    if (actor / "model" / "dist_ckpt").is_dir() or (actor / "dist_ckpt").is_dir():
        raise CheckpointError(
            f"--model {path}: a Megatron checkpoint; merge it first (its merger needs a GPU process group): "
            f"torchrun --nproc_per_node 1 -m verl.model_merger merge --backend megatron --local_dir {actor} "
            f"--target_dir MERGED, then --model MERGED")
    raise CheckpointError(
        f"--model {path}: neither Hugging Face weights (config.json + model.safetensors, here or in "
        "actor/huggingface) nor verl FSDP shards (actor/model_world_size_*_rank_*.pt) to merge; "
        "actor_rollout_ref.actor.checkpoint.save_contents must include 'model' or 'hf_model'")
