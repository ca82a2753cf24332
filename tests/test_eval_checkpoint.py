"""``python -m dyjr_verl.eval --model …/global_step_N`` on verl checkpoints.

Fast tests: a checkpoint that holds nothing loadable (config and tokenizer only, as verl writes them
without 'hf_model', but no FSDP shards), an HF directory without weights, missing shards, a Megatron
layout: each is one ``error:`` line and exit code 2. The e2e test evaluates the step-3 checkpoint of
the tiny GRPO run that conftest's ``grpo_tiny_run`` shares (verl's trainer, default ``save_contents``:
FSDP shards, no HF weights); the CLI merges it with ``verl.model_merger``, then samples it with vLLM.
The run and the evaluation each hold the machine-wide trainer lock (``e2e_utils.machine_lock``), so
do not wrap this file in ``flock``.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from dyjr_verl.eval.__main__ import main
from e2e_utils import machine_lock


@pytest.fixture
def data(tmp_path) -> Path:
    import pandas as pd

    path = tmp_path / "q.parquet"
    pd.DataFrame({"prompt": [[{"role": "user", "content": "1+1?"}]], "reward_model": [{"ground_truth": "2"}],
                  "ability": ["math"], "data_source": ["toy"]}).to_parquet(path)
    return path


@pytest.fixture
def config_only_checkpoint(tmp_path, repo_root) -> Path:
    """``global_step_1`` as verl leaves it with save_contents ['extra'] only: config + tokenizer, no weights."""
    hf = tmp_path / "global_step_1" / "actor" / "huggingface"
    hf.mkdir(parents=True)
    (hf / "config.json").write_text(json.dumps({"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2"}))
    (hf / "tokenizer_config.json").write_text("{}")
    return tmp_path / "global_step_1"


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: --model") and "Traceback" not in err, err
    return err


def test_checkpoint_without_weights_or_shards_is_one_line(config_only_checkpoint, data, tmp_path):
    """Through the real CLI (a subprocess: nothing of vLLM's or verl's may reach stderr)."""
    proc = subprocess.run(
        [sys.executable, "-m", "dyjr_verl.eval", "--model", str(config_only_checkpoint), "--data", f"toy={data}",
         "--out", str(tmp_path / "out")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr[-2000:]
    assert lines[0].startswith(f"error: --model {config_only_checkpoint}: neither Hugging Face weights")
    assert "save_contents must include 'model' or 'hf_model'" in lines[0]
    assert not (tmp_path / "out" / "merged_model").exists()


def test_hf_dir_without_weight_files_is_one_line(config_only_checkpoint, data, tmp_path, capsys):
    hf = config_only_checkpoint / "actor" / "huggingface"
    assert main(["--model", str(hf), "--data", f"toy={data}", "--out", str(tmp_path / "out")]) == 2
    assert "config.json but no complete model weights" in _one_error_line(capsys)


def test_missing_fsdp_shards_are_one_line(config_only_checkpoint, data, tmp_path, capsys):
    actor = config_only_checkpoint / "actor"
    (actor / "fsdp_config.json").write_text(json.dumps({"FSDP_version": 2, "world_size": 2}))
    (actor / "model_world_size_2_rank_0.pt").write_bytes(b"")
    assert main(["--model", str(config_only_checkpoint), "--data", f"toy={data}", "--out", str(tmp_path / "o")]) == 2
    assert "world_size 2 but the model shards of ranks [1] are missing" in _one_error_line(capsys)


def test_damaged_fsdp_shard_is_one_line(config_only_checkpoint, data, tmp_path, capsys):
    """verl's merger itself fails (an empty shard file): its exception becomes the one line, and no
    half-written merge is left to be re-used."""
    actor = config_only_checkpoint / "actor"
    (actor / "fsdp_config.json").write_text(json.dumps({"FSDP_version": 2, "world_size": 1}))
    (actor / "model_world_size_1_rank_0.pt").write_bytes(b"")
    out = tmp_path / "o"
    assert main(["--model", str(config_only_checkpoint), "--data", f"toy={data}", "--out", str(out)]) == 2
    assert "verl.model_merger could not merge the FSDP shards" in _one_error_line(capsys)
    assert not (out / "merged_model").exists() and not (out / "merged_model.partial").exists()


def test_megatron_checkpoint_names_verls_merge_command(config_only_checkpoint, data, tmp_path, capsys):
    (config_only_checkpoint / "actor" / "model" / "dist_ckpt").mkdir(parents=True)
    assert main(["--model", str(config_only_checkpoint), "--data", f"toy={data}", "--out", str(tmp_path / "o")]) == 2
    assert "verl.model_merger merge --backend megatron" in _one_error_line(capsys)


def test_missing_model_dir_is_one_line(data, tmp_path, capsys):
    assert main(["--model", str(tmp_path / "nope"), "--data", f"toy={data}", "--out", str(tmp_path / "o")]) == 2
    assert "no such directory" in _one_error_line(capsys)


@pytest.mark.e2e
def test_eval_merges_a_verl_fsdp_checkpoint_of_a_tiny_run(grpo_tiny_run, tiny_assets, tmp_path):
    # the shared 3-step GRPO run (conftest), saved with verl's default save_contents (FSDP shards +
    # extra, no hf_model)
    run, workdir = grpo_tiny_run
    assert run.returncode == 0, run.tail()
    ckpt = workdir / "checkpoints" / "global_step_3"
    actor = ckpt / "actor"
    assert (actor / "model_world_size_1_rank_0.pt").is_file()
    assert not list((actor / "huggingface").glob("*.safetensors"))  # the case this test is about

    out = tmp_path / "eval"
    with machine_lock():  # vLLM: serialised like the trainer run
        proc = subprocess.run(
            [sys.executable, "-m", "dyjr_verl.eval", "--model", str(ckpt), "--data",
             f"arith={tiny_assets / 'arith' / 'test.parquet'}", "--samples", "4", "--ks", "1", "4", "--limit", "12",
             "--max-tokens", "24", "--out", str(out)], capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    merged = out / "merged_model"
    assert (merged / "model.safetensors").stat().st_size > 0 and (merged / "tokenizer.json").is_file()
    assert not merged.with_name("merged_model.partial").exists()
    # vLLM sampled 4 answers to each of 12 questions from the merged model, and they were scored
    md = (out / "results.md").read_text()
    assert "| arith | 12 |" in md and all(c in md for c in ("mean@4", "maj@4", "pass@1", "pass@4"))
    header = (out / "results.csv").read_text().splitlines()[0].split(",")
    assert {"benchmark", "greedy", "mean@4", "maj@4", "pass@4"} <= set(header)
    gens = [json.loads(line) for line in (out / "generations.jsonl").read_text().splitlines()]
    assert len(gens) == 12 and all(len(g["samples"]) == 4 for g in gens)

    # the merged weights are the trained shard's (verl's merger writes bfloat16)
    import torch
    from safetensors.torch import load_file

    shard = torch.load(actor / "model_world_size_1_rank_0.pt", map_location="cpu", weights_only=False)
    weights = load_file(merged / "model.safetensors")
    common = sorted(set(shard) & set(weights))
    assert len(common) >= 10, (sorted(shard)[:5], sorted(weights)[:5])
    for key in common:
        full = shard[key].full_tensor() if hasattr(shard[key], "full_tensor") else shard[key]
        assert torch.equal(full.to(torch.bfloat16), weights[key]), key

    # a second evaluation re-uses the merge while the shards are unchanged, and re-merges after they change
    from dyjr_verl.eval.checkpoint import resolve_model

    stamp = (merged / "model.safetensors").stat().st_mtime_ns
    assert resolve_model(ckpt, merged) == merged and (merged / "model.safetensors").stat().st_mtime_ns == stamp
    shutil.copy2(actor / "model_world_size_1_rank_0.pt", tmp_path / "shard.pt")
    (actor / "model_world_size_1_rank_0.pt").write_bytes((tmp_path / "shard.pt").read_bytes())  # new mtime
    assert resolve_model(ckpt, merged) == merged and (merged / "model.safetensors").stat().st_mtime_ns != stamp
