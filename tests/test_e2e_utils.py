"""The end-to-end helpers' contract with the machine (no trainer runs here): every trainer run of the
test suite, and its ``ray stop --force``, happens while it holds the machine-wide lock, so
``make test`` started while an experiment runs waits for it instead of killing its Ray cluster."""

from __future__ import annotations

import contextlib
import fcntl
import os

import pytest

import e2e_utils
from dyjr_verl.experiments.process import LockTimeout


def _held_by_someone(path) -> bool:
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)


def test_the_trainer_and_its_ray_stop_run_under_the_machine_lock(tmp_path, monkeypatch):
    lock = tmp_path / "e2e.lock"
    monkeypatch.setattr(e2e_utils, "LOCK", lock)
    calls = []

    def fake_run(cmd, **kwargs):
        calls.append((cmd[2], _held_by_someone(lock)))  # "verl.trainer.main_ppo" / "ray.scripts.scripts"
        return type("Done", (), {"returncode": 0})()

    monkeypatch.setattr(e2e_utils.subprocess, "run", fake_run)
    run = e2e_utils.run_main_ppo("grpo_tiny_cpu", tmp_path / "assets", tmp_path / "work")
    assert calls == [("verl.trainer.main_ppo", True), ("ray.scripts.scripts", True)]
    assert run.returncode == 0 and run.steps == {}
    assert not _held_by_someone(lock)  # released afterwards


class FakeCapture:
    """pytest's capture manager as e2e_utils uses it: records that output capture was lifted."""

    def __init__(self):
        self.lifted = 0

    @contextlib.contextmanager
    def global_and_fixture_disabled(self):
        self.lifted += 1
        yield


def test_conftest_hands_the_real_capture_manager_over(pytestconfig):
    assert e2e_utils.CAPTURE is pytestconfig.pluginmanager.getplugin("capturemanager") is not None


def test_a_busy_lock_is_announced_and_nothing_runs_until_it_is_free(tmp_path, monkeypatch, capfd):
    lock = tmp_path / "e2e.lock"
    monkeypatch.setattr(e2e_utils, "LOCK", lock)
    capture = FakeCapture()
    monkeypatch.setattr(e2e_utils, "CAPTURE", capture)
    monkeypatch.setattr(e2e_utils, "LOCK_WAIT_S", 0)  # give up at once instead of waiting hours
    monkeypatch.setattr(e2e_utils.subprocess, "run", lambda *a, **k: pytest.fail("ran while the lock was busy"))
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o666)
    fcntl.flock(fd, fcntl.LOCK_EX)  # an experiment's run
    try:
        with pytest.raises(LockTimeout):
            e2e_utils.run_main_ppo("grpo_tiny_cpu", tmp_path / "assets", tmp_path / "work")
    finally:
        os.close(fd)
    assert f"[e2e] {lock} is held by another trainer run" in capfd.readouterr().err
    assert capture.lifted == 1  # printed past pytest's capture, once
