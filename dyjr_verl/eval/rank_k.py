"""Rank-1..k token probabilities and entropy of a model on its own generations (evaluation time).

One teacher-forced Hugging Face forward over prompt + sampled response (the exact token ids the
engine produced, so no re-tokenisation drift), and :class:`dyjr_verl.analysis.rank_k.RankKAccumulator`
over the response positions: the positions whose next-token distribution produced a generated token
(the one that emitted EOS included). Cheap for small models; meant for the tiny CPU model of the
miniature reproduction, where the per-step training metrics may be absent.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

__all__ = ["rank_k_of_generations"]


def rank_k_of_generations(model_dir: Path, prompts: Sequence[Sequence[int]], responses: Sequence[Sequence[Sequence[int]]],
                          *, k: int = 8, temperature: float = 1.0, batch: int = 128) -> dict[str, float]:
    """``prompts[i]``: prompt token ids of question i; ``responses[i]``: its sampled responses'
    token ids. Returns ``rank_k/p1..p{k}``, ``rank_k/top{k}_mass``, ``rank_k/entropy``,
    ``rank_k/tokens`` (token-weighted means over all response positions)."""
    import torch
    from tqdm import tqdm
    from transformers import AutoModelForCausalLM

    from dyjr_verl.analysis.rank_k import RankKAccumulator

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.eval()
    pad = model.config.pad_token_id if model.config.pad_token_id is not None else 0
    seqs = [(list(p), list(r)) for p, rs in zip(prompts, responses) for r in rs if len(r)]
    acc = RankKAccumulator(k, temperature=temperature)
    for start in tqdm(range(0, len(seqs), batch), desc="rank-k forward", unit="batch", leave=False):
        chunk = seqs[start:start + batch]
        width = max(len(p) + len(r) for p, r in chunk)
        ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        attn = torch.zeros((len(chunk), width), dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.bool)
        for row, (p, r) in enumerate(chunk):
            ids[row, : len(p) + len(r)] = torch.tensor(p + r)
            attn[row, : len(p) + len(r)] = 1
            # logits at position t predict token t+1: the response tokens are predicted from
            # positions len(p)-1 .. len(p)+len(r)-2
            mask[row, len(p) - 1: len(p) + len(r) - 1] = True
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=attn).logits
        acc.update(logits.float(), mask)
    return acc.compute()
