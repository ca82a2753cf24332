"""Warm start for the miniature reproduction (issue 7): the tiny model, supervised on an embedded
task until RL has room, as a self-contained assets directory.

    python -m dyjr_verl.assets warmstart [--task arith|sql] [--seed 0] [--root DIR] [--force]

The task mixes one-, two- and three-operation word problems whose worked solution is a short chain
of thought (``4 + 9 = 13. 13 - 2 = 11. \\boxed{11}``). The training questions are split into a
*validation slice* (``arith/val.parquet``) and the rest (``arith/train.parquet``: supervised warm
start, then RL); ``arith/test.parquet`` is the held-out split. Supervised training runs in chunks of
``eval_every`` steps and stops at the first chunk whose **validation** greedy accuracy reaches
``target_greedy`` (or at ``max_steps``): every decision is made on the validation slice. The held-out
greedy accuracy and pass@k are measured once, at the end, only to be reported (``WARMSTART.json``).

``--task sql`` does the same on the embedded Text-to-SQL task (:func:`tasks.sql_question_pool`: the
company database, questions from templates whose held-out instances use values never trained on;
the target is the gold query in a ```` ```sql ```` fence; correctness is the execution-match reward), with
``sql/{train,val,test}.parquet`` and ``sql/company.sqlite``.

The output directory is usable as ``DYJR_ASSETS_DIR`` for the ``*_tiny_cpu`` recipes (they read
``tokenizer-model/`` and ``arith/{train,test}.parquet``; the ``*_sql_tiny_cpu`` ones ``sql/``). It is keyed by a hash of the settings, so a
second call with the same settings returns at once; the build is deterministic given the seed
(one or two intra-op threads, seeded data order and sampling).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
import importlib
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from dyjr_verl.assets import tasks
from dyjr_verl.assets.build import (
    AssetSpec,
    _build_model,
    _train_tokenizer,
    default_assets_dir,
    sft_batches,
    sft_step,
    sft_examples,
)

WARMSTART_FILE = "WARMSTART.json"
_VERSION = 1  # bump when the procedure changes, so old caches are not taken for new ones


# each task's settings that differ from the defaults below (the SQL pool has 370 questions, longer answers)
_TASK_DEFAULTS: dict[str, dict[str, Any]] = {"arith": {}, "sql": {"train": 306, "val": 48, "test": 64, "max_new_tokens": 64}}
TASKS = tuple(_TASK_DEFAULTS)


def _check_task(task: str) -> None:
    if task not in _TASK_DEFAULTS:
        raise ValueError(f"unknown warm-start task {task!r}; expected one of {', '.join(TASKS)}")


@dataclass(frozen=True)
class WarmStartSpec:
    task: str = "arith"  # "arith" (the miniature's task) or "sql"; WarmStartSpec.for_task sets its sizes
    seed: int = 0
    train: int = 512  # questions before the validation slice is cut off
    val: int = 64  # validation slice of train: stopping rule, ablation metric
    test: int = 128  # held-out: measured once at the end, never used for a decision
    two_step_share: float = 0.45
    three_step_share: float = 0.30
    lr: float = 3e-3
    batch: int = 32
    eval_every: int = 50
    min_steps: int = 100
    max_steps: int = 1500
    target_greedy: float = 0.35  # stop once validation greedy accuracy reaches this
    eval_samples: int = 8  # samples per question for pass@k at the end (and avg@k on validation)
    temperature: float = 1.0  # the rollout temperature of the tiny recipes
    max_new_tokens: int = 48  # the mini experiment's data.max_response_length

    @classmethod
    def for_task(cls, task: str, **overrides: Any) -> WarmStartSpec:
        """The defaults for ``task``, then ``overrides``."""
        _check_task(task)
        return replace(cls(task=task, **_TASK_DEFAULTS[task]), **overrides)

    def key(self) -> str:
        d = asdict(self)
        if d["task"] == "arith":  # the key from before SQL existed: arithmetic caches and run records stay valid
            del d["task"]
        blob = json.dumps({"v": _VERSION, **d}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:12]

    def model_spec(self) -> AssetSpec:
        # same architecture as the embedded default (361.6k parameters, head_dim 64)
        return AssetSpec(seed=self.seed, arith_train=self.train, arith_test=self.test)


@dataclass
class Accuracy:
    greedy: float
    avg_at_k: float
    pass_at_k: float
    k: int
    questions: int

    def brief(self) -> str:
        return (f"greedy {100 * self.greedy:.1f}%, avg@{self.k} {100 * self.avg_at_k:.1f}%, "
                f"pass@{self.k} {100 * self.pass_at_k:.1f}% ({self.questions} questions)")


@dataclass
class WarmStartResult:
    root: Path
    spec: dict[str, Any]
    steps: int
    val: dict[str, Any]
    test: dict[str, Any]
    curve: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0
    cached: bool = False


def default_warmstart_root(spec: WarmStartSpec) -> Path:
    return default_assets_dir().parent / "warmstart" / spec.key()


def _is_correct(text: str, row: dict) -> bool:
    """The task's own reward (by the row's ``ability``, as ``python -m dyjr_verl.eval`` picks it) says 1."""
    reward = importlib.import_module(f"dyjr_verl.rewards.{row['ability']}")
    out = reward.compute_score(row["data_source"], text, row["reward_model"]["ground_truth"], row["extra_info"])
    return out["score"] >= 1.0


@dataclass
class TaskData:
    """One embedded task cut into the warm start's splits."""

    subdir: str  # <root>/<subdir>/{train,val,test}.parquet
    solutions: list[str]  # the supervised targets of the "train" rows, in order
    corpus: list[str]  # what the tokenizer is trained on
    rows: Callable[[Path], dict[str, list[dict]]]  # split -> verl rows for task files under this dir
    write_files: Callable[[Path], None] = lambda data_dir: None  # the files the rows point at (the SQL DB)


def task_data(spec: WarmStartSpec) -> TaskData:
    # the validation slice is cut from the training questions: neither SFT nor RL sees it
    _check_task(spec.task)
    if spec.task == "arith":
        problems = tasks.arithmetic_problems(spec.train + spec.test, seed=spec.seed,
                                             two_step_share=spec.two_step_share,
                                             three_step_share=spec.three_step_share)
        val_p, fit_p, test_p = problems[: spec.val], problems[spec.val: spec.train], problems[spec.train:]
        train_rows = tasks.arithmetic_rows(fit_p, "train")
        return TaskData(
            subdir="arith", solutions=[p.solution for p in fit_p],
            corpus=[r["prompt"][0]["content"] for r in train_rows] + [p.solution for p in fit_p] + [tasks.ARITH_INSTRUCTION],
            rows=lambda _dir: {"train": train_rows, "val": tasks.arithmetic_rows(val_p, "val"),
                               "test": tasks.arithmetic_rows(test_p, "test")})
    if spec.task == "sql":
        pool = tasks.sql_question_pool(spec.seed)
        if spec.train + spec.test > len(pool):
            raise ValueError(f"the SQL pool has {len(pool)} questions; train + test = {spec.train + spec.test}")
        val_q, fit_q, test_q = pool[: spec.val], pool[spec.val: spec.train], pool[spec.train: spec.train + spec.test]
        solutions = [tasks.sql_solution(gold) for _, gold in fit_q]

        def rows(data_dir: Path) -> dict[str, list[dict]]:
            db = data_dir / "company.sqlite"
            return {"train": tasks.sql_rows(fit_q, db, "train"), "val": tasks.sql_rows(val_q, db, "val"),
                    "test": tasks.sql_rows(test_q, db, "test")}

        return TaskData(
            subdir="sql", solutions=solutions,
            corpus=[r["prompt"][0]["content"] for r in rows(Path("."))["train"]] + solutions + [tasks.SQL_INSTRUCTION],
            rows=rows, write_files=lambda data_dir: tasks.build_company_db(data_dir / "company.sqlite", seed=spec.seed))
    raise AssertionError(f"task {spec.task!r} is in _TASK_DEFAULTS but has no data")


def measure(model, tokenizer, rows: list[dict], *, samples: int, temperature: float, max_new_tokens: int,
            seed: int, batch: int = 64) -> Accuracy:
    """Greedy accuracy and ``samples`` samples per question (avg@k, pass@k = any correct) with HF
    generate, prompts formatted by the chat template exactly as verl's agent loop does."""
    import torch

    from dyjr_verl.eval.metrics import pass_at_k

    tokenizer.padding_side = "left"
    greedy_ok: list[bool] = []
    counts: list[int] = []
    torch.manual_seed(seed)
    for start in range(0, len(rows), batch):
        chunk = rows[start:start + batch]
        texts = [tokenizer.apply_chat_template(r["prompt"], add_generation_prompt=True, tokenize=False) for r in chunk]
        enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        common = {"max_new_tokens": max_new_tokens, "pad_token_id": tokenizer.pad_token_id,
                      "eos_token_id": tokenizer.eos_token_id}
        with torch.no_grad():
            g = model.generate(**enc, do_sample=False, **common)
            s = model.generate(**enc, do_sample=True, temperature=temperature, top_k=0, top_p=1.0,
                               num_return_sequences=samples, **common) if samples else None
        width = enc["input_ids"].shape[1]
        for i, r in enumerate(chunk):
            greedy_ok.append(_is_correct(tokenizer.decode(g[i, width:], skip_special_tokens=True), r))
            if s is not None:
                outs = s[i * samples:(i + 1) * samples, width:]
                counts.append(sum(_is_correct(tokenizer.decode(o, skip_special_tokens=True), r) for o in outs))
    n = len(rows)
    return Accuracy(
        greedy=sum(greedy_ok) / n,
        avg_at_k=sum(counts) / (n * samples) if samples else 0.0,
        pass_at_k=sum(pass_at_k(samples, c, samples) for c in counts) / n if samples else 0.0,
        k=samples,
        questions=n,
    )


def _write_parquet(rows: list[dict], path: Path) -> None:
    import pandas as pd

    path.parent.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows).to_parquet(path, index=False)


def load(root: Path) -> WarmStartResult | None:
    meta = root / WARMSTART_FILE
    if not meta.is_file():
        return None
    d = json.loads(meta.read_text())
    return WarmStartResult(root=root, spec=d["spec"], steps=d["steps"], val=d["val"], test=d["test"],
                           curve=d.get("curve", []), seconds=d.get("seconds", 0.0), cached=True)


def warm_start(spec: WarmStartSpec | None = None, root: Path | None = None, *, force: bool = False,
               progress: Callable[[str], None] = print) -> WarmStartResult:
    """Build (or return the cached) warm-start assets directory for ``spec``."""
    spec = spec or WarmStartSpec()
    root = (root or default_warmstart_root(spec)).resolve()
    cached = load(root)
    if cached is not None and not force and {"task": "arith", **cached.spec} == asdict(spec):
        return cached
    _check_task(spec.task)
    if spec.val < 1 or spec.train <= spec.val or spec.test < 1 or spec.eval_every < 1 or spec.max_steps < spec.min_steps:
        raise ValueError(f"inconsistent warm-start settings: {spec}")

    import torch

    t0 = time.perf_counter()
    # one intra-op thread: the same bits on any machine, and no thread-barrier stalls when the cores
    # are shared with a running trainer (two threads ran 30x slower then)
    saved_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _build(spec, root, t0, progress)
    finally:
        torch.set_num_threads(saved_threads)


def _build(spec: WarmStartSpec, root: Path, t0: float, progress: Callable[[str], None]) -> WarmStartResult:
    import torch
    from tqdm import tqdm

    data = task_data(spec)
    tmp = root.with_name(root.name + f".tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    data.write_files(tmp / data.subdir)
    splits = data.rows(tmp / data.subdir)  # measured here; written below pointing at the final root

    model_spec = spec.model_spec()
    tokenizer = _train_tokenizer(data.corpus, model_spec)
    model = _build_model(tokenizer, model_spec)
    examples = sft_examples(tokenizer, [r["prompt"] for r in splits["train"]], data.solutions)

    torch.manual_seed(spec.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=spec.lr, weight_decay=0.0)
    batches = sft_batches(examples, batch=spec.batch, pad=tokenizer.pad_token_id, seed=spec.seed)
    curve: list[dict[str, Any]] = []
    step, losses = 0, []
    bar = tqdm(total=spec.max_steps, desc="warm start (SFT)", unit="step", leave=False, mininterval=5)
    while step < spec.max_steps:
        model.train()
        for _ in range(spec.eval_every):
            losses.append(sft_step(model, opt, next(batches)))
            step += 1
            bar.update(1)
        model.eval()
        if step < spec.min_steps:
            continue
        # greedy only during the search (cheap); the stopping rule reads the validation slice only
        acc = measure(model, tokenizer, splits["val"], samples=0, temperature=spec.temperature,
                      max_new_tokens=spec.max_new_tokens, seed=spec.seed)
        curve.append({"step": step, "loss": sum(losses[-spec.eval_every:]) / spec.eval_every, "val_greedy": acc.greedy})
        bar.set_postfix(loss=f"{curve[-1]['loss']:.3f}", val_greedy=f"{acc.greedy:.2f}")
        if acc.greedy >= spec.target_greedy:
            break
    bar.close()

    common = {"samples": spec.eval_samples, "temperature": spec.temperature, "max_new_tokens": spec.max_new_tokens,
                  "seed": spec.seed}
    val_acc = measure(model, tokenizer, splits["val"], **common)
    test_acc = measure(model, tokenizer, splits["test"], **common)  # reported, never used to decide

    model_dir = tmp / "tokenizer-model"
    model_dir.mkdir(parents=True)
    model.save_pretrained(model_dir, safe_serialization=True)
    tokenizer.padding_side = "right"  # what verl's agent loop expects from a saved tokenizer
    tokenizer.save_pretrained(model_dir)
    for name, rows in data.rows(root / data.subdir).items():
        _write_parquet(rows, tmp / data.subdir / f"{name}.parquet")
    result = WarmStartResult(root=root, spec=asdict(spec), steps=step, val=asdict(val_acc), test=asdict(test_acc),
                             curve=curve, seconds=round(time.perf_counter() - t0, 1))
    meta = {"spec": result.spec, "key": spec.key(), "steps": step, "val": result.val, "test": result.test,
            "curve": curve, "seconds": result.seconds, "rows": {k: len(v) for k, v in splits.items()},
            "num_parameters": sum(p.numel() for p in model.parameters()),
            "measured_with": "HF generate (greedy + sampled at the given temperature), dyjr_verl.rewards.math"}
    (tmp / WARMSTART_FILE).write_text(json.dumps(meta, indent=2))
    if root.exists():
        shutil.rmtree(root)
    root.parent.mkdir(parents=True, exist_ok=True)
    os.replace(tmp, root)  # atomic: a killed build never leaves a directory that looks finished
    progress(f"warm start: {step} SFT steps; validation {val_acc.brief()}; held-out test {test_acc.brief()}")
    return result
