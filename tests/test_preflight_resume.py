"""A resume whose replay state does not fit the config is refused by the start-up check, before Ray.

The checkpoint is a folder as verl 0.9.1 leaves it (its completion marker ``latest_checkpointed_iteration.txt``
naming ``global_step_<N>``) with our replay state written by our own writer; the refusal goes through
the real ``python -m verl.trainer.main_ppo`` command line (one ``dyjr-verl: error:`` line, exit 2, no
traceback), the accepted configs through ``build_plan`` (what the same hydra callback runs).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from verl.utils.checkpoint.checkpoint_manager import get_checkpoint_tracker_filename

from dyjr_verl.methods import METHODS
from dyjr_verl.plan import build_plan, compose
from dyjr_verl.recipes import recipes_dir
from dyjr_verl.replay.checkpoint import BUFFER_CKPT_NAME, replay_state_folder, save_replay_state

STEP = 3


@pytest.fixture
def run(tmp_path) -> dict:
    """Fake data files, and a checkpoint root whose latest complete step is ``STEP``."""
    for name in ("train.parquet", "test.parquet"):
        (tmp_path / name).write_bytes(b"")  # the start-up check only looks for them
    ckpt = tmp_path / "ckpt"
    (ckpt / f"global_step_{STEP}" / "actor").mkdir(parents=True)
    Path(get_checkpoint_tracker_filename(str(ckpt))).write_text(str(STEP))
    overrides = [f"data.train_files={tmp_path / 'train.parquet'}", f"data.val_files={tmp_path / 'test.parquet'}",
                 f"trainer.default_local_dir={ckpt}"]
    return {"root": tmp_path, "ckpt": ckpt, "overrides": overrides}


def _save_state(ckpt: Path, node: dict) -> None:
    """The replay state a dyjr run with ``node`` saved at ``STEP`` (the trainer's writer)."""
    fingerprint = METHODS["dyjr"].parse(node).replay_fingerprint()
    save_replay_state(replay_state_folder(str(ckpt / f"global_step_{STEP}")),
                      {"store": {}, "rng": None, "fingerprint": fingerprint})


def _main_ppo(run: dict, *extra: str) -> tuple[subprocess.CompletedProcess, list[str]]:
    cmd = [sys.executable, "-m", "verl.trainer.main_ppo", "--config-path", str(recipes_dir()),
           "--config-name", "dyjr_math", *run["overrides"], *extra]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=run["root"])
    return out, [ln for ln in out.stderr.splitlines() if ln.startswith("dyjr-verl: error:")]


def _errors(run: dict, *extra: str) -> list[str]:
    return build_plan(compose("dyjr_math", [*run["overrides"], *extra])).errors


def test_main_ppo_refuses_a_resume_with_another_estimator_in_one_line(run):
    _save_state(run["ckpt"], {"js": {"estimator": "sampled"}})
    out, errors = _main_ppo(run, "dyjr.js.estimator=topk", "dyjr.js.topk_k=4")
    assert out.returncode == 2, out.stderr[-2000:]
    assert len(errors) == 1, errors
    assert f"global_step_{STEP}/actor/{BUFFER_CKPT_NAME} was saved with other replay settings (record_k: saved 0, " \
           "now 4): resume with the settings it was saved with" in errors[0]
    assert "dyjr.replay.resume_empty=true" in errors[0]
    assert "Traceback" not in out.stderr and "ray init kwargs" not in out.stdout  # before Ray


def test_main_ppo_refuses_a_resume_without_replay_state_in_one_line(run):
    out, errors = _main_ppo(run)  # verl's checkpoint, none of ours
    assert out.returncode == 2, out.stderr[-2000:]
    assert len(errors) == 1, errors
    assert f"resuming at step {STEP}, but" in errors[0] and "does not exist" in errors[0]
    assert "dyjr.replay.resume_empty=true" in errors[0]
    assert "Traceback" not in out.stderr and "ray init kwargs" not in out.stdout


def test_matching_or_not_resumed_configs_pass_the_check(run):
    _save_state(run["ckpt"], {"js": {"estimator": "sampled"}})
    changed = ["dyjr.js.estimator=topk", "dyjr.js.topk_k=4"]
    assert _errors(run) == []
    assert _errors(run, "dyjr.js.coef=0.3", "dyjr.buffer.max_age=2") == []  # settings the store re-applies
    assert _errors(run, *changed, "trainer.resume_mode=disable") == []  # starts from scratch
    assert len(_errors(run, *changed)) == 1


def test_resume_path_is_checked_and_resume_empty_allows_a_checkpoint_without_state(run):
    folder = run["ckpt"] / f"global_step_{STEP}"
    by_path = ["trainer.resume_mode=resume_path", f"trainer.resume_from_path={folder}"]
    (errors,) = _errors(run, *by_path)
    assert "does not exist" in errors and "dyjr.replay.resume_empty=true" in errors
    assert _errors(run, *by_path, "dyjr.replay.resume_empty=true") == []
    missing = run["ckpt"] / "global_step_9"
    assert _errors(run, "trainer.resume_mode=resume_path", f"trainer.resume_from_path={missing}") == [
        f"trainer.resume_from_path does not exist: {missing}"]
