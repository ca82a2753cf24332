"""Typed settings of the miniature reproduction (issue 7): which runs, what they share, deadlines.

Fairness rule: every method runs its ``<method>_tiny_cpu`` recipe (``recipes/_tiny_arith.yaml`` holds
the shared GRPO settings: 8 prompts x 4 rollouts per step, lr 5e-5, clip 0.2/0.28, token-mean,
T = 1.0, no KL) from the same warm start, plus the *same* list of shared overrides (steps, response
length, checkpointing) and the same seed overrides; only the method's own node differs.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from dyjr_verl.assets.warmstart import WarmStartSpec
from dyjr_verl.methods import BASELINE, BASELINE_LABEL
from dyjr_verl.methods import METHODS as _METHOD_TABLE

#: GRPO and every method of dyjr_verl.methods.METHODS, in the table's order
METHODS: tuple[str, ...] = (BASELINE, *_METHOD_TABLE)
LABELS = {BASELINE: BASELINE_LABEL, **{name: m.label for name, m in _METHOD_TABLE.items()}}

# 4 methods x 3 seeds in ~90 minutes on 2 cores; the arithmetic is in docs/mini.md
DEFAULT_STEPS = 48
DEFAULT_SEEDS: tuple[int, ...] = (0, 1, 2)
LOCK_PATH = Path("/tmp/dyjr_e2e.lock")  # every trainer / vLLM run on this machine takes it

# One factor at a time around the dyjr_tiny_cpu defaults (max_age 4, coef 0.1, admit correct);
# GRPO is the reference line. Evaluated on the validation slice of train, never on test.
ABLATION_VARIANTS: dict[str, tuple[str, tuple[str, ...]]] = {
    "grpo": ("grpo", ()),
    "dyjr": ("dyjr", ()),
    "dyjr_age1": ("dyjr", ("dyjr.buffer.max_age=1",)),
    "dyjr_age8": ("dyjr", ("dyjr.buffer.max_age=8",)),
    "dyjr_coef0": ("dyjr", ("dyjr.js.coef=0.0",)),  # replay rows with weight 0: is it the JS term?
    "dyjr_coef0.3": ("dyjr", ("dyjr.js.coef=0.3",)),
    "dyjr_admit_all": ("dyjr", ("dyjr.buffer.admit=all",)),
}


@dataclass(frozen=True)
class TaskSettings:
    """What differs between the embedded tasks (data, reward, lengths); the GRPO settings are the
    ``_tiny_arith.yaml`` ones for both, so every method runs its usual ``<method>_tiny_cpu`` recipe."""

    name: str  # the warm start's task and the assets subdirectory
    reward: str  # dyjr_verl.rewards.<reward>
    max_response_length: int
    overrides: tuple[str, ...] = ()


TASKS: dict[str, TaskSettings] = {
    "arith": TaskSettings("arith", "math", 48),  # three-step chains of thought need ~36 tokens
    "sql": TaskSettings("sql", "sql", 64, (  # the gold JOIN queries are ~40 tokens
        "data.train_files=${dyjr_assets}/sql/train.parquet",
        "data.val_files=${dyjr_assets}/sql/val.parquet",
        "data.max_prompt_length=192",
        "reward.custom_reward_function.path=pkg://dyjr_verl.rewards.sql",
    )),
}


@dataclass(frozen=True)
class SharedSettings:
    """Identical for every method (and written into every run's JSON)."""

    steps: int = DEFAULT_STEPS
    max_response_length: int = TASKS["arith"].max_response_length

    def overrides(self) -> list[str]:
        return [
            f"trainer.total_training_steps={self.steps}",
            f"data.max_response_length={self.max_response_length}",
            f"trainer.save_freq={self.steps}",  # one checkpoint, at the end, for the evaluation
            "trainer.resume_mode=disable",  # a restarted run starts from the warm start, never a stale checkpoint
            "actor_rollout_ref.actor.checkpoint.save_contents=[model,extra,hf_model]",  # hf_model: for the eval CLI
        ]


@dataclass(frozen=True)
class EvalSettings:
    split: str = "test"  # "val" for the ablation: settings are never chosen on held-out data
    samples: int = 32
    ks: tuple[int, ...] = (1, 8, 32)
    rank_k: int = 8
    temperature: float = 1.0  # the rollout temperature


@dataclass(frozen=True)
class CollectSettings:
    """RLEP phase 1 on the warm-start model (stands in for RLEP's trained checkpoint), once per seed."""

    n: int = 8
    temperature: float = 0.7  # RLEP's
    top_p: float = 0.95


@dataclass(frozen=True)
class Deadlines:
    lock_wait_s: float = 4 * 3600.0  # other sessions' e2e runs hold /tmp/dyjr_e2e.lock meanwhile
    train_base_s: float = 900.0  # start-up + first step + checkpoint
    train_per_step_s: float = 30.0  # a steady tiny step is ~3 s
    eval_s: float = 1200.0
    collect_s: float = 900.0
    ray_stop_s: float = 120.0

    def train_s(self, steps: int) -> float:
        return self.train_base_s + self.train_per_step_s * steps


@dataclass(frozen=True)
class RunSpec:
    """One trainer run: ``label`` names its directory (the method, or an ablation variant)."""

    label: str
    method: str
    seed: int
    extra: tuple[str, ...] = ()

    @property
    def recipe(self) -> str:
        return f"{self.method}_tiny_cpu"

    def dir(self, out: Path) -> Path:
        return out / self.label / f"seed{self.seed}"


@dataclass(frozen=True)
class Experiment:
    out: Path
    runs: tuple[RunSpec, ...]
    shared: SharedSettings = field(default_factory=SharedSettings)
    eval: EvalSettings = field(default_factory=EvalSettings)
    collect: CollectSettings = field(default_factory=CollectSettings)
    warmstart: WarmStartSpec = field(default_factory=WarmStartSpec)
    deadlines: Deadlines = field(default_factory=Deadlines)
    kind: str = "comparison"  # or "ablation"
    task: str = "arith"  # a key of TASKS; its warm start is ``warmstart`` (fingerprinted by its key)

    @property
    def task_settings(self) -> TaskSettings:
        return TASKS[self.task]

    def fingerprint(self, run: RunSpec) -> str:
        """What a finished run's result depends on; a finished run with another fingerprint is stale."""
        blob = {"run": asdict(run), "shared": asdict(self.shared), "eval": asdict(self.eval),
                "collect": asdict(self.collect) if run.method == "rlep" else None, "warmstart": self.warmstart.key()}
        return hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()[:16]


def comparison(out: Path, methods: list[str], seeds: list[int], shared: SharedSettings, **kw) -> Experiment:
    runs = tuple(RunSpec(m, m, s) for s in seeds for m in methods)  # seed-major: partial results cover every method
    return Experiment(out=out, runs=runs, shared=shared, **kw)


def ablation(out: Path, variants: list[str], seed: int, shared: SharedSettings, **kw) -> Experiment:
    runs = tuple(RunSpec(v, ABLATION_VARIANTS[v][0], seed, ABLATION_VARIANTS[v][1]) for v in variants)
    return Experiment(out=out, runs=runs, shared=shared, eval=EvalSettings(split="val"), kind="ablation", **kw)
