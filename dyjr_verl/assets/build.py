"""Build the embedded default assets: tokenizer, tiny Qwen2 model, arithmetic and SQL datasets.

Everything is local and deterministic given the seed: no model hub, no dataset hub. The layout::

    <root>/tokenizer-model/   tokenizer + Qwen2ForCausalLM (+ generation config), loadable by verl/vLLM
    <root>/arith/{train,test}.parquet
    <root>/sql/{train,test}.parquet, <root>/sql/company.sqlite
    <root>/MANIFEST.json      what was built, with which settings

A random model never writes ``\\boxed{<right number>}``, so every reward would be 0 and GRPO's
advantages (hence the policy gradient) would be exactly zero. The build therefore ends with a short
supervised warm start on the training split's worked solutions (a few seconds on 2 cores): enough
for the format and some right answers, far from all of them, which is where RL has something to do.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

from dyjr_verl.assets import tasks

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def default_assets_dir() -> Path:
    """``$DYJR_ASSETS_DIR`` or ``~/.cache/dyjr_verl/assets`` (recipes resolve the same way)."""
    env = os.environ.get("DYJR_ASSETS_DIR")
    return Path(env).expanduser().resolve() if env else Path.home() / ".cache" / "dyjr_verl" / "assets"


@dataclass(frozen=True)
class AssetSpec:
    seed: int = 0
    arith_train: int = 512
    arith_test: int = 128
    vocab_size: int = 512
    hidden_size: int = 128
    num_layers: int = 2
    num_heads: int = 2  # head_dim = 64: a size vLLM's CPU attention kernel supports (16 is not)
    num_kv_heads: int = 1
    intermediate_size: int = 256
    max_positions: int = 512
    warmup_steps: int = 300
    warmup_lr: float = 3e-3
    warmup_batch: int = 32


def _train_tokenizer(corpus: list[str], spec: AssetSpec):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    # Digits stay single tokens so arithmetic is learnable by a tiny model.
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=spec.vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>", bos_token=None, unk_token=None
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.model_max_length = spec.max_positions
    return fast


def _build_model(tokenizer, spec: AssetSpec):
    import torch
    from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(spec.seed)
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_kv_heads,
        max_position_embeddings=spec.max_positions,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        torch_dtype="float32",
    )
    model = Qwen2ForCausalLM(config)
    model.generation_config = GenerationConfig(
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.pad_token_id
    )
    return model


def sft_examples(tokenizer, prompts: list[list[dict]], responses: list[str]) -> list[tuple[list[int], int]]:
    """(token ids, prompt length) pairs formatted exactly as verl's agent loop will prompt the model."""
    out = []
    for msgs, resp in zip(prompts, responses):
        p_ids = tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True)
        if not isinstance(p_ids, list):  # transformers 5 may return a BatchEncoding
            p_ids = p_ids["input_ids"]
        r_ids = tokenizer(resp, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        out.append((list(p_ids) + r_ids, len(p_ids)))
    return out


def sft_batches(examples, *, batch: int, pad: int, seed: int):
    """Endless seeded stream of padded (ids, attention, labels) batches, loss on responses only."""
    import torch

    g = torch.Generator().manual_seed(seed)
    while True:
        idx = torch.randint(len(examples), (batch,), generator=g).tolist()
        seqs = [examples[i] for i in idx]
        width = max(len(s) for s, _ in seqs)
        ids = torch.full((batch, width), pad, dtype=torch.long)
        labels = torch.full((batch, width), -100, dtype=torch.long)
        attn = torch.zeros((batch, width), dtype=torch.long)
        for r, (s, plen) in enumerate(seqs):
            ids[r, : len(s)] = torch.tensor(s)
            labels[r, plen : len(s)] = torch.tensor(s[plen:])
            attn[r, : len(s)] = 1
        yield ids, attn, labels


def sft_step(model, opt, batch) -> float:
    """One optimizer step of next-token SFT on an ``(ids, attention, labels)`` batch; returns the loss."""
    import torch

    ids, attn, labels = batch
    loss = model(input_ids=ids, attention_mask=attn, labels=labels).loss
    opt.zero_grad()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    return float(loss.detach())


def supervised_warm_start(model, tokenizer, examples, *, steps: int, lr: float, batch: int, seed: int) -> list[float]:
    """Plain next-token SFT on responses only; returns the loss curve (for the manifest)."""
    import torch

    if steps <= 0:
        return []
    torch.manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    batches = sft_batches(examples, batch=batch, pad=tokenizer.pad_token_id, seed=seed)
    losses = []
    model.train()
    for _ in range(steps):
        losses.append(sft_step(model, opt, next(batches)))
    model.eval()
    return losses


def build(root: Path | None = None, spec: AssetSpec | None = None, force: bool = False) -> Path:
    """Build every asset under ``root``; a no-op when a manifest with the same spec is present."""
    import pandas as pd
    import torch

    spec = spec or AssetSpec()
    root = (root or default_assets_dir()).resolve()
    manifest_path = root / "MANIFEST.json"
    if not force and manifest_path.exists():
        if json.loads(manifest_path.read_text()).get("spec") == asdict(spec):
            return root
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

    problems = tasks.arithmetic_problems(spec.arith_train + spec.arith_test, seed=spec.seed)
    train_p, test_p = problems[: spec.arith_train], problems[spec.arith_train :]
    db_path = root / "sql" / "company.sqlite"
    tasks.build_company_db(db_path, seed=spec.seed)
    sql_pairs = tasks.sql_questions(seed=spec.seed)
    n_sql_test = max(4, len(sql_pairs) // 4)
    sql_train, sql_test = sql_pairs[n_sql_test:], sql_pairs[:n_sql_test]

    arith_train_rows = tasks.arithmetic_rows(train_p, "train")
    arith_test_rows = tasks.arithmetic_rows(test_p, "test")
    sql_train_rows = tasks.sql_rows(sql_train, db_path, "train")
    sql_test_rows = tasks.sql_rows(sql_test, db_path, "test")
    for sub, rows in [
        ("arith/train", arith_train_rows),
        ("arith/test", arith_test_rows),
        ("sql/train", sql_train_rows),
        ("sql/test", sql_test_rows),
    ]:
        out = root / f"{sub}.parquet"
        out.parent.mkdir(parents=True, exist_ok=True)
        pd.DataFrame(rows).to_parquet(out, index=False)

    corpus = [r["prompt"][0]["content"] for r in arith_train_rows + sql_train_rows]
    corpus += [p.solution for p in train_p] + [gold for _, gold in sql_pairs] + [tasks.ARITH_INSTRUCTION]
    tokenizer = _train_tokenizer(corpus, spec)
    model = _build_model(tokenizer, spec)
    examples = sft_examples(tokenizer, [r["prompt"] for r in arith_train_rows], [p.solution for p in train_p])
    losses = supervised_warm_start(
        model, tokenizer, examples, steps=spec.warmup_steps, lr=spec.warmup_lr, batch=spec.warmup_batch, seed=spec.seed
    )

    model_dir = root / "tokenizer-model"
    model_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(model_dir, safe_serialization=True)
    tokenizer.save_pretrained(model_dir)
    manifest = {
        "spec": asdict(spec),
        "model_dir": str(model_dir),
        "num_parameters": sum(p.numel() for p in model.parameters()),
        "vocab_size": len(tokenizer),
        "warm_start_loss_first_last": [losses[0], losses[-1]] if losses else None,
        "files": {
            "arith_train": str(root / "arith/train.parquet"),
            "arith_test": str(root / "arith/test.parquet"),
            "sql_train": str(root / "sql/train.parquet"),
            "sql_test": str(root / "sql/test.parquet"),
            "sql_db": str(db_path),
        },
        "rows": {
            "arith_train": len(arith_train_rows),
            "arith_test": len(arith_test_rows),
            "sql_train": len(sql_train_rows),
            "sql_test": len(sql_test_rows),
        },
    }
    manifest_path.write_text(json.dumps(manifest, indent=2))
    return root
