"""Shared pytest fixtures.

tests/ has no __init__.py and pytest runs with --import-mode=importlib, so verl's wheel-installed
top-level ``tests`` package can never shadow these files (see pyproject.toml).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"
# importlib mode puts no test directory on sys.path; the e2e helpers and the TransferQueue stand-in
# live beside the tests, and some tests share helpers with a test module of another folder.
_TESTS = Path(__file__).resolve().parent
for _folder in (_TESTS, _TESTS / "replay", _TESTS / "methods" / "dyjr"):
    sys.path.insert(0, str(_folder))


def pytest_configure(config):
    import e2e_utils

    # a test waiting for the machine-wide trainer lock says so on the console, past output capture
    e2e_utils.CAPTURE = config.pluginmanager.getplugin("capturemanager")


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO_ROOT


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The project's offline benchmark data (MATH-500, AIME, AMC, Spider), ../shared/data."""
    if not SHARED_DATA.is_dir():
        pytest.fail(f"shared benchmark data not found at {SHARED_DATA} (expected beside the checkout)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def tiny_assets(tmp_path_factory) -> Path:
    """The embedded default assets (tiny model, tokenizer, tasks), built once per test session, under
    the machine lock: the build's supervised warm start is minutes of CPU, which must not share the
    2 cores with an experiment's run (only e2e tests use these assets)."""
    from dyjr_verl.assets.build import AssetSpec, build
    from e2e_utils import machine_lock

    with machine_lock():
        return build(tmp_path_factory.mktemp("tiny_assets"), AssetSpec())


@pytest.fixture(scope="session")
def grpo_tiny_run(tiny_assets, tmp_path_factory):
    """One 3-step run of the ``grpo_tiny_cpu`` recipe through verl's trainer, saving its step-3
    checkpoint with verl's default ``save_contents`` (FSDP shards, no HF weights). Shared by the
    trainer test and the checkpoint-eval test: one trainer start (Ray, vLLM, FSDP) fewer in CI.
    Returns ``(run, workdir)``."""
    from e2e_utils import run_main_ppo

    workdir = tmp_path_factory.mktemp("grpo_tiny_run")
    run = run_main_ppo("grpo_tiny_cpu", tiny_assets, workdir, "trainer.total_training_steps=3", "trainer.save_freq=3")
    return run, workdir


@pytest.fixture
def one_intra_op_thread():
    """Many small block ops (the top-k kernel tests): on a shared 2-core machine intra-op thread
    barriers make them erratic (seconds instead of tens of ms); one thread keeps them fast and steady."""
    import torch

    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(saved)
