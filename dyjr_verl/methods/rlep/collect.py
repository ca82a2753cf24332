"""RLEP phase 1: build the experience pool from a trained checkpoint (vLLM offline inference).

    python -m dyjr_verl.methods.rlep.collect --model CKPT_DIR --data train.parquet --out pool.parquet \\
        [--n 64] [--temperature 0.7] [--top-p 0.95] [--max-tokens 3072] [--min-correct 2] [--limit N]

For every training question (or the first ``--limit``), ``--n`` answers are sampled from the
model, verified with the task reward (default ``pkg://dyjr_verl.rewards.math``, verl's
``compute_score(data_source, solution_str, ground_truth, extra_info)`` signature; a rollout counts
as correct when its score exceeds ``--correct-threshold``), and questions with at least
``--min-correct`` correct answers are written to the pool: one parquet row per question
keyed by :func:`dyjr_verl.replay.questions.question_key`, with the answer strings (RLEP stores strings,
not tokens or log-probs). ``rlep.pool_path`` points the trainer at it.

RLEP's defaults (paper, section 3): 64 samples, T = 0.7, top-p 0.95, >= 2 correct, from a
checkpoint of a baseline run (DAPO-nodyn, step 400); the official collection script is not
released, so batching and prompt formatting (the tokenizer's chat template with a generation
prompt, as verl's single-turn agent loop) are ours. Every correct sample is stored, duplicates
included (the paper keeps "the verifier-correct ones"); ``--dedup`` stores distinct strings and then
applies ``--min-correct`` to distinct answers.

Repeated questions (same chat messages and data source: DAPO-Math-17k holds each prompt 100 times)
are sampled once; the count dropped is reported. Progress is a tqdm bar on stderr. The work is done
in chunks of ``--batch-questions`` questions, each written to ``<out>.parts/part-NNNNNN.parquet``
when verified; rerunning the same command after a kill skips the finished chunks, and a rerun with
other sampling settings, model, reward or questions is refused (one line). The parts are kept after
the pool is written (a rerun with another ``--min-correct`` rebuilds the pool from them at once);
delete the directory to collect afresh. On GPU each question is sampled with its own seed (from
``--seed`` and its key), so a resumed run samples each question as an uninterrupted one would (up
to GPU numerics); vLLM's CPU sampler has engine seeding only, so there a resumed run samples its
remaining chunks differently.

On a machine without an accelerator, ``import verl`` loads the dyjr_verl plugin first, which sets
vLLM's CPU environment (``VLLM_TARGET_DEVICE=cpu``, a 1 GiB KV cache); the engine then runs with
``enforce_eager=True`` in float32. The tiny recipe's pool takes about a minute on 2 cores::

    python -m dyjr_verl.methods.rlep.collect --model DIR/tokenizer-model --data DIR/arith/train.parquet \\
        --out DIR/arith/rlep_pool.parquet --n 8 --max-tokens 32
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Optional

__all__ = ["main", "collect", "load_questions", "run_collection", "parts_dir", "load_reward_fn", "select_correct"]


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
    from dyjr_verl.replay.questions import plain

    return plain(x)


def load_questions(df: Any, prompt_key: str = "prompt", limit: int = 0) -> tuple[list[dict[str, Any]], int]:
    """Distinct questions of a verl training frame, in file order, and how many rows repeated one.

    A repeat (same chat messages and data source, i.e. the same :func:`question_key`) is sampled
    once: DAPO-Math-17k holds each prompt 100 times. ``limit`` keeps the first N distinct questions."""
    from dyjr_verl.replay.questions import question_key

    if prompt_key not in df.columns:
        raise ValueError(f"no {prompt_key!r} column in the data (columns: {', '.join(map(str, df.columns))})")
    questions, seen, duplicates = [], set(), 0
    for idx, row in enumerate(df.to_dict("records")):
        messages = _plain(row[prompt_key])
        if isinstance(messages, str):
            messages = [{"role": "user", "content": messages}]
        source = row.get("data_source")
        key = question_key(messages, source)
        if key in seen:
            duplicates += 1
            continue
        if limit and len(questions) >= limit:
            break
        seen.add(key)
        reward_model = _plain(row.get("reward_model") or {})
        extra = _plain(row.get("extra_info") or {})
        index = extra.get("index") if isinstance(extra, dict) else None
        questions.append({
            "question_key": key, "messages": messages, "data_source": source,
            "ground_truth": reward_model.get("ground_truth"), "extra_info": extra,
            # the row number when extra_info.index is absent or not a number (DAPO-Math-17k: a uuid)
            "index": index if isinstance(index, int) and not isinstance(index, bool) else idx,
        })
    return questions, duplicates


# what decides the sampled answers: a resumed collection must match on every one of these
RESUME_SETTINGS = ("model", "n", "temperature", "top_p", "max_tokens", "seed", "reward", "reward_name",
                   "correct_threshold", "dedup", "batch_questions", "prompt_key", "dtype", "max_model_len")
_PART_COLUMNS = ("question_key", "data_source", "index", "num_samples", "num_correct", "candidates")


def parts_dir(out: str | Path) -> Path:
    """Where finished chunks of a collection are kept (beside the pool): ``<out>.parts/``."""
    return Path(str(out) + ".parts")


def _settings(args: argparse.Namespace, questions: list[dict[str, Any]]) -> dict[str, Any]:
    import hashlib

    s = {k: getattr(args, k) for k in RESUME_SETTINGS}
    s["model"] = str(Path(str(s["model"])).expanduser())
    # the questions themselves rather than the --data path (the file may move between machines):
    # prompts, sources and answers in order (after --limit), so chunk i holds the same questions
    h = hashlib.sha256()
    for q in questions:
        h.update(f"{q['question_key']}\0{q['ground_truth']}\1".encode())
    s["questions"], s["questions_digest"] = len(questions), h.hexdigest()[:16]
    return s


def _open_parts(args: argparse.Namespace, questions: list[dict[str, Any]]) -> tuple[Path, dict[str, Any]]:
    """The parts directory with its settings record; refuses one written with other settings."""
    d = parts_dir(args.out)
    settings = _settings(args, questions)
    record = d / "settings.json"
    if record.exists():
        saved = json.loads(record.read_text())
        diff = [k for k in sorted(set(settings) | set(saved["settings"])) if settings.get(k) != saved["settings"].get(k)]
        if diff:
            shown = ", ".join(f"{k}: {saved['settings'].get(k)!r} -> {settings.get(k)!r}" for k in diff)
            raise ValueError(f"{d} holds a collection with other settings ({shown}); pass the same settings to "
                             f"resume it, or delete {d} to start afresh")
        return d, saved
    d.mkdir(parents=True, exist_ok=True)
    saved = {"settings": settings, "created": time.strftime("%Y-%m-%dT%H:%M:%S")}
    tmp = record.with_suffix(".tmp")
    tmp.write_text(json.dumps(saved, indent=1))
    tmp.replace(record)
    return d, saved


#: parquet schema metadata of a part: the seconds its chunk took (sampling + scoring), so a resumed
#: collection still reports what the whole pool cost
CHUNK_SECONDS_KEY = b"dyjr_chunk_s"


def chunk_seconds(path: Path) -> Optional[float]:
    """The recorded seconds of a finished part (None: written without a record)."""
    import pyarrow.parquet as pq

    value = (pq.read_schema(path).metadata or {}).get(CHUNK_SECONDS_KEY)
    return None if value is None else float(value)


def _write_part(path: Path, rows: list[dict[str, Any]], seconds: Optional[float] = None) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = pa.schema([("question_key", pa.string()), ("data_source", pa.string()), ("index", pa.int64()),
                        ("num_samples", pa.int64()), ("num_correct", pa.int64()), ("candidates", pa.list_(pa.string()))])
    table = pa.Table.from_pylist(
        [{**{k: r[k] for k in _PART_COLUMNS}, "data_source": None if r["data_source"] is None else str(r["data_source"]),
          "index": None if r["index"] is None else int(r["index"])} for r in rows], schema=schema)
    if seconds is not None:
        table = table.replace_schema_metadata({CHUNK_SECONDS_KEY: f"{seconds:.1f}"})
    tmp = path.with_suffix(".tmp")
    pq.write_table(table, tmp)
    tmp.replace(path)  # a killed run leaves no half-written part behind


def run_collection(
    questions: list[dict[str, Any]],
    args: argparse.Namespace,
    generate: Callable[[list[dict[str, Any]]], list[list[str]]],
    reward_fn: Callable[..., Any],
) -> dict[str, Any]:
    """Sample, verify and store every question, one chunk of ``--batch-questions`` at a time.

    ``generate(chunk)`` returns the sampled answer strings of each question. Each finished chunk is
    written to ``<out>.parts/part-NNNNNN.parquet``; a rerun with the same settings skips the chunks
    already there, so a killed collection resumes where it stopped, and the pool is assembled from
    the parts in question order."""
    import pyarrow.parquet as pq
    from tqdm import tqdm

    from dyjr_verl.methods.rlep.pool import RLEPPool

    d, record = _open_parts(args, questions)
    starts = range(0, len(questions), args.batch_questions)
    part = {start: d / f"part-{i:06d}.parquet" for i, start in enumerate(starts)}
    done = [start for start in starts if part[start].exists()]
    resumed = sum(len(questions[s : s + args.batch_questions]) for s in done)
    if done:
        print(f"rlep_collect: resuming: {len(done)} of {len(starts)} chunks ({resumed} questions) already in {d}",
              file=sys.stderr, flush=True)
    bar = tqdm(total=len(questions), initial=resumed, desc="rlep_collect", unit="question", file=sys.stderr)
    with ThreadPoolExecutor(max_workers=args.reward_workers) as pool, bar:
        for start in starts:
            if part[start].exists():
                continue
            chunk = questions[start : start + args.batch_questions]
            t0 = time.monotonic()
            rows = []
            for q, answers in zip(chunk, generate(chunk), strict=True):
                futures = [
                    pool.submit(reward_fn, data_source=q["data_source"], solution_str=a,
                                ground_truth=q["ground_truth"], extra_info=dict(q["extra_info"] or {}))
                    for a in answers
                ]
                scores = [_score_value(f.result()) for f in futures]
                rows.append({**q, "num_samples": len(answers),
                             "num_correct": sum(s > args.correct_threshold for s in scores),
                             "candidates": select_correct(answers, scores, threshold=args.correct_threshold,
                                                          dedup=args.dedup)})
            _write_part(part[start], rows, seconds=time.monotonic() - t0)
            bar.update(len(chunk))

    entries, rows = {}, []
    for start in starts:
        for r in pq.read_table(part[start]).to_pylist():
            rows.append(r)
            if len(r["candidates"]) >= args.min_correct:
                entries[r["question_key"]] = r["candidates"]
    sampled = sum(r["num_samples"] for r in rows)
    correct_total = sum(r["num_correct"] for r in rows)
    meta = {**{k: record["settings"][k] for k in ("model", "n", "temperature", "top_p", "max_tokens", "seed", "reward")},
            "data": str(args.data), "questions_sampled": len(questions), "created": record["created"]}
    pool_obj = RLEPPool(entries, min_correct=args.min_correct, meta=meta)
    out = pool_obj.save(args.out, rows=[r for r in rows if r["question_key"] in entries])
    resumed_s = [chunk_seconds(part[start]) for start in done]
    return {
        "out": str(out), "parts": str(d), "questions": len(questions), "resumed_questions": resumed,
        # what the chunks of earlier launches took (None: one of them has no record): with this launch's
        # wall time, the cost of the whole pool
        "resumed_chunk_s": None if None in resumed_s else round(sum(resumed_s), 1),
        "pool_questions": len(pool_obj), "stored_answers": pool_obj.num_candidates, "samples": sampled,
        "sample_accuracy": correct_total / sampled if sampled else 0.0,
    }


def vllm_generator(args: argparse.Namespace) -> Callable[[list[dict[str, Any]]], list[list[str]]]:
    """``generate(chunk)`` backed by vLLM offline inference on ``--model``."""
    import verl  # noqa: F401  loads the dyjr_verl plugin: CPU environment for vLLM when no accelerator

    from transformers import AutoTokenizer
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    from dyjr_verl import compat

    tokenizer = AutoTokenizer.from_pretrained(args.model, trust_remote_code=args.trust_remote_code)
    on_cpu = compat.is_active()
    dtype = args.dtype or ("float32" if on_cpu else "auto")
    llm = LLM(
        model=args.model, tokenizer=args.model, dtype=dtype, seed=args.seed, enforce_eager=on_cpu or args.enforce_eager,
        tensor_parallel_size=args.tensor_parallel_size, gpu_memory_utilization=args.gpu_memory_utilization,
        max_model_len=args.max_model_len, trust_remote_code=args.trust_remote_code,
        **({} if on_cpu else {"enable_prefix_caching": True}),
    )

    def params(q: dict[str, Any]) -> Any:
        # On GPU every question gets its own seed (from --seed and its key), so its answers do not
        # depend on which chunk it is in or on a resume. vLLM's CPU sampler cannot seed a request
        # ("CPU Generator does not use offset"): there only the engine seed applies, and a resumed
        # CPU collection samples the remaining chunks from a fresh engine state.
        seed = None if on_cpu else (args.seed * 1_000_003 + int(q["question_key"], 16)) % (2**63)
        return SamplingParams(n=args.n, temperature=args.temperature, top_p=args.top_p, max_tokens=args.max_tokens,
                              seed=seed)

    def generate(chunk: list[dict[str, Any]]) -> list[list[str]]:
        prompts = []
        for q in chunk:
            ids = tokenizer.apply_chat_template(q["messages"], add_generation_prompt=True, tokenize=True)
            if hasattr(ids, "input_ids"):  # transformers may return a BatchEncoding
                ids = ids["input_ids"]
            prompts.append(TokensPrompt(prompt_token_ids=list(ids)))
        outputs = llm.generate(prompts, [params(q) for q in chunk], use_tqdm=False)
        # decoded exactly like verl's reward managers decode a rollout
        return [[tokenizer.decode(list(c.token_ids), skip_special_tokens=True) for c in out.outputs] for out in outputs]

    return generate


def collect(args: argparse.Namespace) -> dict[str, Any]:
    import pandas as pd

    t0 = time.perf_counter()
    questions, duplicates = load_questions(pd.read_parquet(args.data), args.prompt_key, args.limit)
    if not questions:
        raise ValueError(f"--data {args.data}: no questions")
    print(f"rlep_collect: {len(questions)} distinct questions ({duplicates} duplicate rows dropped)",
          file=sys.stderr, flush=True)
    _open_parts(args, questions)  # refuse other settings before loading the model
    reward_fn = load_reward_fn(args.reward, args.reward_name)
    engine: dict[str, Any] = {}

    def generate(chunk: list[dict[str, Any]]) -> list[list[str]]:
        # the model is loaded only when a chunk is left to sample (not for a finished collection)
        if "fn" not in engine:
            t = time.perf_counter()
            engine["fn"] = vllm_generator(args)
            engine["load_s"] = round(time.perf_counter() - t, 1)
        return engine["fn"](chunk)

    summary = run_collection(questions, args, generate, reward_fn)
    summary.update({"duplicate_rows": duplicates, "load_s": engine.get("load_s", 0.0),
                    "total_s": round(time.perf_counter() - t0, 1)})
    return summary


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m dyjr_verl.methods.rlep.collect", description=__doc__,
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
    p.add_argument("--limit", type=int, default=0, help="only the first N distinct questions (0 = all)")
    p.add_argument("--batch-questions", type=int, default=256,
                   help="questions per vLLM generate call and per resumable chunk (<out>.parts/)")
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
    if args.n < 1 or args.min_correct < 1 or args.batch_questions < 1:
        print("rlep_collect: error: --n, --min-correct and --batch-questions must be >= 1", file=sys.stderr)
        return 2
    for flag, value in (("--model", args.model), ("--data", args.data)):
        local = flag == "--data" or str(value).startswith(("/", ".", "~"))  # --model may be a hub id
        if local and not Path(value).expanduser().exists():
            print(f"rlep_collect: error: {flag} does not exist: {value}", file=sys.stderr)
            return 2
    try:
        summary = collect(args)
    except ValueError as exc:
        print(f"rlep_collect: error: {exc}", file=sys.stderr)
        return 2
    print("rlep_collect: " + json.dumps(summary), flush=True)
    return 0


if __name__ == "__main__":  # vLLM's engine runs in a spawned process: the guard is required
    sys.exit(main())
