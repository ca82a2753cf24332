"""RLEP phase 1: build the experience pool from a trained checkpoint (vLLM offline inference).

    python -m dyjr_verl.baselines.rlep_collect --model CKPT_DIR --data train.parquet --out pool.parquet \\
        [--n 64] [--temperature 0.7] [--top-p 0.95] [--max-tokens 3072] [--min-correct 2] [--limit N]

For every training question (or the first ``--limit``), ``--n`` answers are sampled from the
model, verified with the task reward (default ``pkg://dyjr_verl.rewards.math``, verl's
``compute_score(data_source, solution_str, ground_truth, extra_info)`` signature; a rollout counts
as correct when its score exceeds ``--correct-threshold``), and questions with at least
``--min-correct`` correct answers are written to the pool: one parquet row per question
keyed by :func:`dyjr_verl.replay.pools.question_key`, with the answer strings (RLEP stores strings,
not tokens or log-probs). ``rlep.pool_path`` points the trainer at it.

RLEP's defaults (paper, section 3): 64 samples, T = 0.7, top-p 0.95, >= 2 correct, from a
checkpoint of a baseline run (DAPO-nodyn, step 400); the official collection script is not
released, so batching and prompt formatting (the tokenizer's chat template with a generation
prompt, as verl's single-turn agent loop) are ours. Every correct sample is stored, duplicates
included (the paper keeps "the verifier-correct ones"); ``--dedup`` stores distinct strings and then
applies ``--min-correct`` to distinct answers.

On a machine without an accelerator, ``import verl`` loads the dyjr_verl plugin first, which sets
vLLM's CPU environment (``VLLM_TARGET_DEVICE=cpu``, a 1 GiB KV cache); the engine then runs with
``enforce_eager=True`` in float32. The tiny recipe's pool takes about a minute on 2 cores::

    python -m dyjr_verl.baselines.rlep_collect --model DIR/tokenizer-model --data DIR/arith/train.parquet \\
        --out DIR/arith/rlep_pool.parquet --n 8 --max-tokens 32
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable

__all__ = ["main", "collect", "load_reward_fn", "select_correct"]


def load_reward_fn(path: str, name: str = "compute_score") -> Callable[..., Any]:
    """The reward function at ``path`` (file path, ``file://`` or ``pkg://module``), as verl loads it."""
    from verl.utils.import_utils import load_extern_object

    return load_extern_object(module_path=path, object_name=name)


def _score_value(result: Any) -> float:
    return float(result["score"] if isinstance(result, dict) else result)


def select_correct(answers: list[str], scores: list[float], *, threshold: float, dedup: bool = False) -> list[str]:
    """The answers whose score exceeds ``threshold``, in sample order, optionally deduplicated."""
    out, seen = [], set()
    for a, s in zip(answers, scores, strict=True):
        if s > threshold and (not dedup or a not in seen):
            out.append(a)
            seen.add(a)
    return out


def _plain(x: Any) -> Any:
    from dyjr_verl.replay.pools import _plain as plain

    return plain(x)


def collect(args: argparse.Namespace) -> dict[str, Any]:
    import verl  # noqa: F401  loads the dyjr_verl plugin: CPU environment for vLLM when no accelerator

    import pandas as pd
    from transformers import AutoTokenizer

    from dyjr_verl import compat
    from dyjr_verl.replay.pools import RLEPPool, question_key

    t0 = time.perf_counter()
    df = pd.read_parquet(args.data)
    if args.limit:
        df = df.iloc[: args.limit]
    prompt_key = args.prompt_key
    tokenizer = AutoTokenizer.from_pretrained(args.model, trust_remote_code=args.trust_remote_code)

    questions = []
    for idx, row in enumerate(df.to_dict("records")):
        messages = _plain(row[prompt_key])
        if isinstance(messages, str):
            messages = [{"role": "user", "content": messages}]
        source = row.get("data_source")
        reward_model = _plain(row.get("reward_model") or {})
        extra = _plain(row.get("extra_info") or {})
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        if hasattr(ids, "input_ids"):  # transformers may return a BatchEncoding
            ids = ids["input_ids"]
        questions.append({
            "question_key": question_key(messages, source), "data_source": source,
            "ground_truth": reward_model.get("ground_truth"), "extra_info": extra,
            "index": extra.get("index", idx) if isinstance(extra, dict) else idx, "prompt_ids": list(ids),
        })

    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    on_cpu = compat.is_active()
    dtype = args.dtype or ("float32" if on_cpu else "auto")
    llm = LLM(
        model=args.model, tokenizer=args.model, dtype=dtype, seed=args.seed, enforce_eager=on_cpu or args.enforce_eager,
        tensor_parallel_size=args.tensor_parallel_size, gpu_memory_utilization=args.gpu_memory_utilization,
        max_model_len=args.max_model_len, trust_remote_code=args.trust_remote_code,
        **({} if on_cpu else {"enable_prefix_caching": True}),
    )
    # the engine seed makes runs reproducible; a per-request seed would need a generator offset,
    # which vLLM's CPU path does not support ("CPU Generator does not use offset")
    params = SamplingParams(n=args.n, temperature=args.temperature, top_p=args.top_p, max_tokens=args.max_tokens)
    t_load = time.perf_counter()

    reward_fn = load_reward_fn(args.reward, args.reward_name)
    rows, entries = [], {}
    sampled = correct_total = 0
    with ThreadPoolExecutor(max_workers=args.reward_workers) as pool:
        for start in range(0, len(questions), args.batch_questions):
            chunk = questions[start : start + args.batch_questions]
            outputs = llm.generate([TokensPrompt(prompt_token_ids=q["prompt_ids"]) for q in chunk], params, use_tqdm=False)
            for q, out in zip(chunk, outputs, strict=True):
                # decoded exactly like verl's reward managers decode a rollout
                answers = [tokenizer.decode(list(c.token_ids), skip_special_tokens=True) for c in out.outputs]
                futures = [
                    pool.submit(reward_fn, data_source=q["data_source"], solution_str=a,
                                ground_truth=q["ground_truth"], extra_info=dict(q["extra_info"] or {}))
                    for a in answers
                ]
                scores = [_score_value(f.result()) for f in futures]
                keep = select_correct(answers, scores, threshold=args.correct_threshold, dedup=args.dedup)
                n_correct = sum(s > args.correct_threshold for s in scores)
                sampled += len(answers)
                correct_total += n_correct
                if len(keep) >= args.min_correct:
                    entries[q["question_key"]] = keep
                    rows.append({**q, "num_samples": len(answers), "num_correct": n_correct})
    meta = {
        "model": str(args.model), "data": str(args.data), "n": args.n, "temperature": args.temperature,
        "top_p": args.top_p, "max_tokens": args.max_tokens, "seed": args.seed, "reward": args.reward,
        "questions_sampled": len(questions), "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    pool_obj = RLEPPool(entries, min_correct=args.min_correct, meta=meta)
    out = pool_obj.save(args.out, rows=rows)
    summary = {
        "out": str(out), "questions": len(questions), "pool_questions": len(pool_obj),
        "stored_answers": pool_obj.num_candidates, "samples": sampled,
        "sample_accuracy": correct_total / sampled if sampled else 0.0,
        "load_s": round(t_load - t0, 1), "total_s": round(time.perf_counter() - t0, 1),
    }
    return summary


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m dyjr_verl.baselines.rlep_collect", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="checkpoint / model directory (HF format) to sample from")
    p.add_argument("--data", required=True, help="training parquet in verl's schema")
    p.add_argument("--out", required=True, help="pool parquet to write (rlep.pool_path)")
    p.add_argument("--n", type=int, default=64, help="answers sampled per question (RLEP: 64)")
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--max-tokens", type=int, default=3072, help="response budget (match data.max_response_length)")
    p.add_argument("--min-correct", type=int, default=2, help="questions need this many correct answers (RLEP: 2)")
    p.add_argument("--correct-threshold", type=float, default=0.5, help="score above which an answer is correct")
    p.add_argument("--dedup", action="store_true",
                   help="store identical correct answers once (default: keep every correct sample, so the uniform "
                        "draw of the trainer weights answers by how often the model produced them)")
    p.add_argument("--limit", type=int, default=0, help="only the first N questions (0 = all)")
    p.add_argument("--batch-questions", type=int, default=256, help="questions per vLLM generate call")
    p.add_argument("--reward", default="pkg://dyjr_verl.rewards.math", help="reward module (path or pkg://module)")
    p.add_argument("--reward-name", default="compute_score")
    p.add_argument("--reward-workers", type=int, default=8, help="threads calling the reward function")
    p.add_argument("--prompt-key", default="prompt")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", default=None, help="vLLM dtype (default: float32 on CPU, auto on GPU)")
    p.add_argument("--enforce-eager", action="store_true", help="no CUDA graphs (always on for CPU)")
    p.add_argument("--tensor-parallel-size", type=int, default=1)
    p.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument("--trust-remote-code", action="store_true")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.n < 1 or args.min_correct < 1:
        print("rlep_collect: error: --n and --min-correct must be >= 1", file=sys.stderr)
        return 2
    for flag, value in (("--model", args.model), ("--data", args.data)):
        local = flag == "--data" or str(value).startswith(("/", ".", "~"))  # --model may be a hub id
        if local and not Path(value).expanduser().exists():
            print(f"rlep_collect: error: {flag} does not exist: {value}", file=sys.stderr)
            return 2
    summary = collect(args)
    print("rlep_collect: " + json.dumps(summary), flush=True)
    return 0


if __name__ == "__main__":  # vLLM's engine runs in a spawned process: the guard is required
    sys.exit(main())
