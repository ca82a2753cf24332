"""Settings of the SmolLM2 collapse experiment (issue 15, steps 5-6): runs, measurement, cost.

Every method runs its ``<method>_smollm2_cpu`` recipe (``_tiny_arith`` GRPO settings + the regime of
``_smollm2_arith.yaml``: model, data, lr, batch, lengths) from SmolLM2-135M-Instruct, with the *same*
shared overrides (:meth:`CollapseSettings.overrides`) and seed overrides; only the method's own node
and an ablation's overrides differ. The cost arithmetic behind the defaults is in :class:`CostModel`
(printed by ``python -m dyjr_verl.experiments.collapse estimate``) and in docs/collapse.md.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

from dyjr_verl.experiments.config import CollectSettings, Deadlines, EvalSettings, RunSpec
from dyjr_verl.recipes import recipes_dir

#: label -> (recipe method, overrides). The five lines of the main comparison.
MAIN_METHODS: dict[str, tuple[str, tuple[str, ...]]] = {
    "grpo": ("grpo", ()),
    "dyjr": ("dyjr", ()),
    "dyjr_fkl": ("dyjr", ("dyjr.js.divergence=forward_kl",)),  # KL(pi_stored || pi_theta) on replayed tokens
    "rlep": ("rlep", ()),
    "exgrpo": ("exgrpo", ()),
}
LABELS = {"grpo": "GRPO", "dyjr": "DyJR (JS)", "dyjr_fkl": "DyJR (forward KL)", "rlep": "RLEP", "exgrpo": "Ex-GRPO"}

#: One factor at a time, one seed, validation slice only. References: the main comparison's seed-0
#: GRPO and DyJR runs (same recipe, same seed, same validation slice; DyJR's window is ``fixed``).
ABLATIONS: dict[str, tuple[str, tuple[str, ...]]] = {
    # verl's KL-Cov with verl's defaults (policy_loss.kl_cov_ratio 0.0002, ppo_kl_coef 0.1)
    "klcov": ("grpo", ("actor_rollout_ref.actor.policy_loss.loss_mode=kl_cov",)),
    "dyjr_coef0": ("dyjr", ("dyjr.js.coef=0.0",)),  # replayed rows weigh nothing: is it the divergence term?
    "dyjr_admit_all": ("dyjr", ("dyjr.buffer.admit=all",)),
    "dyjr_adaptive_window": ("dyjr", ("dyjr.buffer.window=adaptive",)),  # vs the default fixed window
    # the two ablation modes of the DyJR trainer (methods/dyjr/config.py: buffer.frozen, replay.as_pg)
    "dyjr_frozen_ref": ("dyjr", ("dyjr.buffer.frozen=true",)),  # filled once from the start model
    "dyjr_replay_pg": ("dyjr", ("dyjr.replay.as_pg=true",)),  # replayed rows through the PG loss
}

DEFAULT_SEEDS: tuple[int, ...] = (0, 1, 2)
#: mirrors _smollm2_arith.yaml (data v4 = `collapse_data` defaults); passed to the trainer as DYJR_COLLAPSE_DATA
DEFAULT_DATA_DIR = Path("~/.cache/dyjr_verl/collapse_data/v4").expanduser()
DATA_ENV, MODEL_ENV = "DYJR_COLLAPSE_DATA", "DYJR_SMOLLM2_DIR"


@dataclass(frozen=True)
class CollapseSettings:
    """Identical for every run (and written into every run record)."""

    # the search's GRPO halved entropy by step 6, the comparison's GRPO seed 0 only by step 19; the paper's
    # re-inflation starts at step 25-30, so 30 steps (the budget's estimate: `estimate`)
    steps: int = 30
    save_freq: int = 5  # checkpoint interval: a kill loses at most 5 steps
    test_freq: int = 10  # held-out mean@K every 10 steps (and at step 0 and the last step)
    val_k: int = 64  # samples per held-out question (issue: k >= 64)
    val_questions: int = 8  # the first 8 questions of val.parquet, the same for every run
    max_response_length: int = 64  # _smollm2_arith.yaml's; the evaluation uses the same

    @property
    def quantum(self) -> int:
        """A budget-limited segment ends on a multiple of this: a checkpoint and a validation step."""
        return math.lcm(self.save_freq, self.test_freq)

    def overrides(self, *, end_step: int, val_files: Path, checkpoints: Path, resume_from: int) -> list[str]:
        return [
            f"trainer.total_training_steps={end_step}",  # the segment's end; == steps for an uncut run
            f"trainer.save_freq={self.save_freq}",
            f"trainer.test_freq={self.test_freq}",
            "trainer.resume_mode=auto",  # continue from the latest checkpoint under default_local_dir
            f"trainer.default_local_dir={checkpoints}",
            f"trainer.val_before_train={str(resume_from == 0).lower()}",  # step 0 once, never at a resume
            f"data.val_files={val_files}",
            f"data.max_response_length={self.max_response_length}",
            f"actor_rollout_ref.rollout.val_kwargs.n={self.val_k}",
            "actor_rollout_ref.rollout.val_kwargs.do_sample=true",
            "actor_rollout_ref.rollout.val_kwargs.temperature=1.0",
        ]


def collapse_eval(split: str) -> EvalSettings:
    """64 samples at T = 1 + greedy; pass@k for k = 1..64; no Rank-k forward (the trainer's probe logs
    Rank-1..3 per step, and an HF forward over 64 samples per question would cost more than the sampling)."""
    return EvalSettings(split=split, samples=64, ks=tuple(range(1, 65)), rank_k=0, temperature=1.0)


def recipes_digest() -> str:
    """Of every shipped recipe file: a run's checkpoints were trained with its recipe's whole composition
    (an edit to a shared fragment such as _smollm2_arith.yaml makes partial runs stale, not resumable)."""
    h = hashlib.sha256()
    for path in sorted(recipes_dir().glob("*.yaml")):
        h.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()[:16]


@dataclass(frozen=True)
class CollapseExperiment:
    out: Path
    runs: tuple[RunSpec, ...]
    kind: str = "comparison"  # or "ablation"
    settings: CollapseSettings = field(default_factory=CollapseSettings)
    eval_split: str = "test"  # "val" for the ablation
    eval_questions: int = 24  # the first 24 questions of the split (``--limit``): what fits the 8-h budget
    collect: CollectSettings = field(default_factory=CollectSettings)
    # collect_s: a hang bound over the collection's ~45 min (top-p sampling, CostModel.collect_tokens_per_s);
    # a collection cut by it keeps its finished chunks and the next launch resumes them
    deadlines: Deadlines = field(default_factory=lambda: Deadlines(train_base_s=1200.0, train_per_step_s=240.0,
                                                                   eval_s=2400.0, collect_s=5400.0))
    data_dir: Path = DEFAULT_DATA_DIR

    @property
    def eval(self) -> EvalSettings:
        return collapse_eval(self.eval_split)

    def fingerprint(self, run: RunSpec, data_manifest: dict, model_manifest: dict, *, training_only: bool = False) -> str:
        """What a run's result depends on; a finished run made with another one is stale. ``training_only``:
        what its checkpoints depend on -- without the run's length, so that a partial run can be
        extended to more steps by resuming from its checkpoints (verl's lr schedule here is constant)."""
        settings = asdict(self.settings)
        if training_only:
            settings.pop("steps")
        blob = {"run": asdict(run), "settings": settings, "eval": asdict(self.eval), "recipes": recipes_digest(),
                "eval_questions": self.eval_questions,
                "collect": asdict(self.collect) if run.method == "rlep" else None,
                "data": data_manifest, "model": {k: model_manifest.get(k) for k in ("source", "format", "parameters")}}
        return hashlib.sha256(json.dumps(blob, sort_keys=True, default=str).encode()).hexdigest()[:16]


def comparison(out: Path, labels: list[str], seeds: list[int], settings: CollapseSettings, **kw) -> CollapseExperiment:
    # seed-major: partial results cover every method
    runs = tuple(RunSpec(label, MAIN_METHODS[label][0], s, MAIN_METHODS[label][1]) for s in seeds for label in labels)
    return CollapseExperiment(out=out, runs=runs, settings=settings, **kw)


def ablation(out: Path, variants: list[str], seed: int, settings: CollapseSettings, **kw) -> CollapseExperiment:
    runs = tuple(RunSpec(v, ABLATIONS[v][0], seed, ABLATIONS[v][1]) for v in variants)
    kw.setdefault("eval_questions", settings.val_questions)
    return CollapseExperiment(out=out, runs=runs, settings=settings, kind="ablation", eval_split="val", **kw)


@dataclass(frozen=True)
class CostModel:
    """Wall seconds of the experiment on 2 cores from a few rates (defaults: the comparison's GRPO seed 0,
    results/collapse/search.md run s4, quiet machine; ``estimate --step-s ... --tokens-per-s ...``)."""

    step_s: float = 40.0  # one steady GRPO step (4 prompts x 8 rollouts, ~15-tokens answers): median 39.6 s
    tokens_per_s: float = 300.0  # vLLM-CPU generation (the base evaluation, 1024 samples in flight)
    response_tokens: float = 45.0  # per sample of the start model (RLEP's collection) and a bound for the evaluation
    validation_s: float = 100.0  # one held-out validation (8 questions x 64 samples) inside verl: 74-150 s measured
    startup_s: float = 90.0  # Ray, TransferQueue, FSDP2, vLLM per trainer launch
    checkpoint_s: float = 5.0  # model + optimizer (~1.6 GB) per save: 3-5.5 s measured
    eval_fixed_s: float = 90.0  # FSDP shard merge + vLLM start-up of the eval CLI
    collect_questions: int = 448  # RLEP's pool: every training question ...
    collect_fixed_s: float = 40.0
    # ... sampled at RLEP's top-p 0.95: vLLM-CPU sorts the 49k-token vocabulary for every sampled token,
    # which dominates (py-spy); 256 questions x 8 samples took 24 min on 2 cores (rlep seed 0, 2026-12-02)
    collect_tokens_per_s: float = 64.0

    def sampling_s(self, samples: float, tokens_per_s: float | None = None) -> float:
        return samples * self.response_tokens / (tokens_per_s or self.tokens_per_s)

    def validations(self, s: CollapseSettings) -> int:
        return 1 + s.steps // s.test_freq + (s.steps % s.test_freq != 0)  # step 0, every test_freq, the last

    def run_s(self, s: CollapseSettings, eval_questions: int, eval_samples: int = 64, segments: int = 1) -> dict:
        parts = {
            "start-up": segments * self.startup_s,
            "training steps": s.steps * self.step_s,
            "checkpoints": math.ceil(s.steps / s.save_freq) * self.checkpoint_s,
            "held-out validation": self.validations(s) * self.validation_s,
            "final evaluation": self.eval_fixed_s + self.sampling_s(eval_questions * (eval_samples + 1)),
        }
        return {**parts, "total": sum(parts.values())}

    def collect_s(self, c: CollectSettings) -> float:
        return self.collect_fixed_s + self.sampling_s(self.collect_questions * c.n, self.collect_tokens_per_s)

    def experiment_s(self, exp: CollapseExperiment) -> dict:
        per_run = self.run_s(exp.settings, exp.eval_questions)
        seeds = {r.seed for r in exp.runs if r.method == "rlep"}
        total = len(exp.runs) * per_run["total"] + len(seeds) * self.collect_s(exp.collect)
        return {"runs": len(exp.runs), "per_run": per_run, "rlep_collections": len(seeds),
                "collect_s": self.collect_s(exp.collect), "total_s": total}
