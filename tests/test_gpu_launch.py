"""Day one on a GPU cluster (issue 12): the installed package ships its recipes, ``plan`` reports
what a step will do at any cluster shape, replay is never silently zero, and every setting that
would be ignored or cut is refused with one line before Ray starts."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import zipfile
from pathlib import Path
from types import SimpleNamespace

import pytest

from dyjr_verl.plan import build_plan, compose
from dyjr_verl.plan import main as plan_main
from dyjr_verl.recipes import recipe_names, recipes_dir
from dyjr_verl.replay.layout import UpdateShape, place_replay_rows, plan_minibatches

REPO = Path(__file__).resolve().parents[1]
PAPER_SCALE = [  # 8 nodes x 8 GPUs, micro-batch 4, 512 prompts x 16 rollouts, mini-batch 64 prompts
    "trainer.nnodes=8", "trainer.n_gpus_per_node=8", "data.train_batch_size=512", "actor_rollout_ref.rollout.n=16",
    "actor_rollout_ref.actor.ppo_mini_batch_size=64", "actor_rollout_ref.actor.use_dynamic_bsz=false",
    "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=4",
    "actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu=4",
]
SHAPES = {
    "recipe_default": [],
    "2x8_micro2": ["trainer.nnodes=2", "trainer.n_gpus_per_node=8", "data.train_batch_size=128",
                   "actor_rollout_ref.actor.ppo_mini_batch_size=32", "actor_rollout_ref.actor.use_dynamic_bsz=false",
                   "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=2",
                   "actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu=2"],
    "8x8_micro4_512x16": PAPER_SCALE,
}
REPLAY_METHODS = ("dyjr", "rlep", "exgrpo")


@pytest.fixture(scope="module")
def fake_inputs(tmp_path_factory) -> dict[str, str]:
    """Files the start-up check looks for (it never reads them): data, pool, the tiny model's config."""
    root = tmp_path_factory.mktemp("inputs")
    for rel in ("arith/train.parquet", "arith/test.parquet", "arith/rlep_pool.parquet", "sql/train.parquet",
                "sql/test.parquet", "train.parquet", "test.parquet", "pool.parquet",
                "collapse/train.parquet", "collapse/val.parquet", "collapse/rlep_pool.parquet"):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(b"")
    (root / "tokenizer-model").mkdir()
    (root / "tokenizer-model" / "config.json").write_text(json.dumps({"max_position_embeddings": 512}))
    return {"root": str(root), "train": str(root / "train.parquet"), "test": str(root / "test.parquet"),
            "pool": str(root / "pool.parquet")}


def _recipe_overrides(name: str, inputs: dict[str, str]) -> list[str]:
    if name.endswith("_cpu"):
        return []  # their data live under DYJR_ASSETS_DIR
    out = [f"data.train_files={inputs['train']}", f"data.val_files={inputs['test']}"]
    if name.startswith("rlep"):
        out.append(f"rlep.pool_path={inputs['pool']}")
    return out


# ------------------------------------------------------------------------------------------------
# packaging
# ------------------------------------------------------------------------------------------------


def test_wheel_ships_every_recipe_and_composes_them_from_the_printed_path(tmp_path):
    """Build the wheel, install it outside the checkout, and compose every recipe from the
    directory that the installed ``python -m dyjr_verl recipes`` prints."""
    wheels = tmp_path / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(wheels), str(REPO)], check=True, cwd=tmp_path, capture_output=True, timeout=300)
    (wheel,) = wheels.glob("dyjr_verl-*.whl")
    shipped = {Path(n).name for n in zipfile.ZipFile(wheel).namelist() if n.startswith("dyjr_verl/recipes/")}
    expected = {p.name for p in recipes_dir().glob("*.yaml")}
    assert expected and expected <= shipped, f"missing from the wheel: {sorted(expected - shipped)}"

    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site), str(wheel)],
                   check=True, capture_output=True, timeout=300)
    env = {**os.environ, "PYTHONPATH": str(site)}
    printed = subprocess.run([sys.executable, "-m", "dyjr_verl", "recipes"], cwd=tmp_path, env=env,
                             capture_output=True, text=True, timeout=120, check=True).stdout.strip()
    assert Path(printed).resolve().is_relative_to(site.resolve()), printed
    script = (
        "import sys; from hydra import compose, initialize_config_dir\n"
        "from dyjr_verl.recipes import recipe_names\n"
        "names = recipe_names(); assert len(names) >= 14, names\n"
        "for name in names:\n"
        "    with initialize_config_dir(config_dir=sys.argv[1], version_base=None):\n"
        "        cfg = compose(config_name=name)\n"
        "    assert cfg.trainer.experiment_name, name\n"
        "print(len(names))\n"
    )
    out = subprocess.run([sys.executable, "-c", script, printed], cwd=tmp_path, env=env, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert int(out.stdout.strip()) == len(recipe_names())


def test_doctor_fails_without_recipes(monkeypatch, capsys):
    from dyjr_verl import doctor

    monkeypatch.setattr(doctor, "_recipe_problems", lambda: ["no recipes in /nowhere"])
    assert doctor.run() == 1
    assert "no recipes in /nowhere" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------
# plan
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", list(SHAPES))
def test_plan_every_recipe_at_cluster_shapes(shape, fake_inputs, monkeypatch, capsys):
    """``plan --json`` (the CLI's own entry, in-process) on every recipe; the same object as build_plan."""
    monkeypatch.setenv("DYJR_ASSETS_DIR", fake_inputs["root"])
    # the *_smollm2_cpu recipes read their model and data from these (docs/collapse.md)
    monkeypatch.setenv("DYJR_COLLAPSE_DATA", str(Path(fake_inputs["root"]) / "collapse"))
    monkeypatch.setenv("DYJR_SMOLLM2_DIR", str(Path(fake_inputs["root"]) / "tokenizer-model"))
    for name in recipe_names():
        overrides = _recipe_overrides(name, fake_inputs) + SHAPES[shape]
        if name.endswith("_cpu") and shape != "recipe_default":
            overrides += ["data.max_prompt_length=128", "data.max_response_length=64"]
        cfg = compose(name, overrides)
        assert plan_main(["--config-name", name, "--json", *overrides]) == 0, (name, shape, capsys.readouterr())
        plan = SimpleNamespace(**json.loads(capsys.readouterr().out.strip().splitlines()[-1]))
        assert plan.errors == [] and plan == SimpleNamespace(**build_plan(cfg).to_dict()), (name, shape, plan.errors)
        assert plan.fresh_rows_per_step > 0 and plan.optimizer_steps_per_step >= 1, (name, plan)
        if plan.method in REPLAY_METHODS:
            assert plan.replay_rows_per_step > 0 and plan.replay_rows_per_minibatch > 0, (name, shape, plan)
        else:
            assert plan.replay_rows_per_step == 0
        if shape == "8x8_micro4_512x16":
            mp = 1
            if cfg.actor_rollout_ref.actor.strategy == "megatron":  # dp = world / (tp x pp x cp)
                m = cfg.actor_rollout_ref.actor.megatron
                mp = m.tensor_model_parallel_size * m.pipeline_model_parallel_size * m.context_parallel_size
            assert plan.actor_dp == 64 // mp and plan.fresh_rows_per_step == 8192


def test_plan_json_cli_at_paper_scale(fake_inputs):
    out = subprocess.run(
        [sys.executable, "-m", "dyjr_verl", "plan", "--config-name", "dyjr_math", "--json",
         *_recipe_overrides("dyjr_math", fake_inputs), *PAPER_SCALE],
        capture_output=True, text=True, timeout=120, cwd=REPO,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    plan = json.loads(out.stdout.strip().splitlines()[-1])
    for key in ("fresh_rows_per_step", "replay_rows_per_step", "replay_rows_per_minibatch",
                "optimizer_steps_per_step", "buffer_bytes_per_step", "errors", "warnings"):
        assert key in plan
    # 128 wanted per mini-batch, multiple 64 x 4 = 256: rounded up to one multiple, never down to 0
    assert plan["replay_rows_per_minibatch"] == 256 and plan["replay_rows_per_step"] == 2048
    assert plan["optimizer_steps_per_step"] == 8 and plan["errors"] == []
    assert any("replay share 0.250 instead of 0.125" in w for w in plan["warnings"])


def test_plan_exits_2_with_errors_in_json(fake_inputs):
    out = subprocess.run([sys.executable, "-m", "dyjr_verl", "plan", "--config-name", "dyjr_math", "--json"],
                         capture_output=True, text=True, timeout=120, cwd=REPO)
    assert out.returncode == 2
    plan = json.loads(out.stdout.strip().splitlines()[-1])
    assert any("data.train_files is not set" in e for e in plan["errors"])


def test_plan_unknown_recipe_is_one_line():
    out = subprocess.run([sys.executable, "-m", "dyjr_verl", "plan", "--config-name", "no_such_recipe"],
                         capture_output=True, text=True, timeout=120, cwd=REPO)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert [ln for ln in out.stderr.splitlines() if ln.startswith("dyjr-verl: error:")] == [out.stderr.strip()]


# ------------------------------------------------------------------------------------------------
# replay placement (shared by the trainer and plan)
# ------------------------------------------------------------------------------------------------


def test_placement_never_rounds_wanted_rows_to_zero():
    shape = UpdateShape(fresh_rows=8192, minibatch_rows=1024, dp=64, micro=4)
    p = place_replay_rows(1024, shape)  # the case that used to floor to 0
    assert (p.per_minibatch, p.rows) == (256, 2048)
    assert p.problems() == ([], [p.problems()[1][0]]) and "0.250" in p.problems()[1][0]
    assert place_replay_rows(0, shape).rows == 0
    exact = place_replay_rows(1024, UpdateShape(8192, 1024, dp=64, micro=1))
    assert exact.per_minibatch == 128 and exact.problems() == ([], [])
    nearest = place_replay_rows(1000, UpdateShape(8192, 1024, dp=8, micro=4))  # 125 -> 128
    assert nearest.per_minibatch == 128
    errors, _ = place_replay_rows(80, shape).problems()  # 10 wanted per mini-batch, 256 the least
    assert len(errors) == 1 and "no replay placement within 2x" in errors[0]
    # the store holds fewer rows than planned: as many whole multiples as it has
    assert place_replay_rows(1024, shape, available=2047).rows == 0
    assert place_replay_rows(4096, shape, available=2100).rows == 2048


@pytest.mark.parametrize("dp,micro,per_mb_target", [(1, 4, 3), (2, 2, 9), (8, 4, 100), (64, 4, 128), (64, 1, 7)])
def test_placement_is_nearest_valid_multiple(dp, micro, per_mb_target):
    shape = UpdateShape(fresh_rows=4 * 1024, minibatch_rows=1024, dp=dp, micro=micro)
    p = place_replay_rows(per_mb_target * 4, shape)
    m = dp * micro
    assert p.per_minibatch % m == 0 and p.per_minibatch >= m
    candidates = [k * m for k in range(1, 64)]
    assert abs(p.per_minibatch - per_mb_target) == min(abs(c - per_mb_target) for c in candidates)


def test_rlep_keeps_official_minibatch_rows():
    # 512 x (16 + 2) rows in mini-batches of 64 x 16: 9 optimizer steps, as the official code takes
    assert plan_minibatches(8192, 9216, rows_per_minibatch=1024, row_multiple=256, keep_minibatch_rows=True) == (9, 1024)
    assert plan_minibatches(8192, 9216, rows_per_minibatch=1024, row_multiple=256) == (8, 1280)


# ------------------------------------------------------------------------------------------------
# refusals: one line, exit 2, no traceback, before Ray starts
# ------------------------------------------------------------------------------------------------

REFUSALS = {
    "async_mode": (["trainer.v1.trainer_mode=colocate_async"], "dyjr.enable=true but trainer.v1.trainer_mode=colocate_async"),
    "legacy_trainer": (["trainer.use_v1=false"], "dyjr.enable=true but trainer.use_v1=false"),
    "no_data_files": (None, "data.train_files is not set"),
    "beyond_context": (["data.max_response_length=4096"], "exceeds the model's context window 4096"),
    "pad_to_length_probe": (["actor_rollout_ref.actor.pad_to_length=true"], "diagnostics.rank_k=8 needs verl's old-log-prob"),
    "pad_to_length_topk": (["actor_rollout_ref.actor.pad_to_length=true", "diagnostics.rank_k=0", "dyjr.js.estimator=topk"],
                           "dyjr.js.estimator=topk needs verl's old-log-prob forward: not with actor_rollout_ref.actor.pad_to_length"),
    "no_replay_placement": (PAPER_SCALE + ["dyjr.replay.size=0.01"], "no replay placement within 2x"),
}


@pytest.mark.parametrize("case", list(REFUSALS))
def test_main_ppo_refuses_with_one_line(case, fake_inputs):
    extra, message = REFUSALS[case]
    data = [] if extra is None else _recipe_overrides("dyjr_math", fake_inputs)
    cmd = [sys.executable, "-m", "verl.trainer.main_ppo", "--config-path", str(recipes_dir()),
           "--config-name", "dyjr_math", *data, *(extra or [])]
    # timeout: a hang fails; "before Ray" (not a wall-clock bound, which a loaded machine breaks) is the
    # assertion that the refusal costs no cluster start-up
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=fake_inputs["root"])
    errors = [ln for ln in out.stderr.splitlines() if ln.startswith("dyjr-verl: error:")]
    assert out.returncode == 2, out.stderr[-2000:]
    assert len(errors) == (2 if case == "no_data_files" else 1), errors  # train_files and val_files
    assert message in errors[0], errors
    assert "Traceback" not in out.stderr and "ray init kwargs" not in out.stdout


def test_rlep_minibatches_share_rows_evenly_and_padding_is_dealt():
    """Few replayed rows: the extra step holds an even share, not 80 real rows and the padding."""
    from dyjr_verl.replay.layout import spread_rows

    steps, rows = plan_minibatches(8192, 8192 + 80, rows_per_minibatch=1024, row_multiple=64, keep_minibatch_rows=True)
    assert steps == 9 and rows == 64 * math.ceil(8272 / (9 * 64)) and steps * rows >= 8272
    kinds = [0] * 8192 + [1] * 80 + [2] * (steps * rows - 8272)
    order = spread_rows(kinds, 8, steps)
    per_rank, per_mb = len(order) // 8, rows // 8
    for d in range(8):
        part = order[d * per_rank : (d + 1) * per_rank]
        real = [sum(kinds[i] != 2 for i in part[j * per_mb : (j + 1) * per_mb]) for j in range(steps)]
        assert max(real) - min(real) <= 1, real  # no step made of padding
    # rows dealt round robin never overflow a mini-batch, whatever the kinds
    order = spread_rows([1, 2, 0, 0], 1, 4)
    assert sorted(order) == [0, 1, 2, 3]


def test_plan_accepts_what_verl_pads_and_the_deprecated_global_micro_batch(fake_inputs):
    data = _recipe_overrides("grpo_math", fake_inputs)
    plan = build_plan(compose("grpo_math", data + ["data.train_batch_size=96"]))  # 768 rows, mini 512
    assert plan.errors == [] and plan.fresh_rows_per_step == 1024 and plan.optimizer_steps_per_step == 2
    assert any("verl pads 768 rows per step to 1024" in w for w in plan.warnings)
    plan = build_plan(compose("dyjr_math", _recipe_overrides("dyjr_math", fake_inputs) + [
        "actor_rollout_ref.actor.use_dynamic_bsz=false", "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=null",
        "actor_rollout_ref.actor.ppo_micro_batch_size=32"]))
    assert plan.errors == [] and plan.micro_batch_rows == 4  # 32 over 8 ranks


def test_context_override_is_what_verl_uses(fake_inputs, tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"max_position_embeddings": 4096}))
    base = _recipe_overrides("grpo_math", fake_inputs) + [f"actor_rollout_ref.model.path={model}",
                                                          "data.max_response_length=7168"]
    assert any("exceeds the model's context window 4096" in e for e in build_plan(compose("grpo_math", base)).errors)
    plan = build_plan(compose("grpo_math", base + ["+actor_rollout_ref.model.override_config.max_position_embeddings=8192"]))
    assert plan.errors == [] and plan.model_context == 8192
