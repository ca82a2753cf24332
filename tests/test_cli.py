"""One CLI: ``dyjr-verl <command>`` reaches every tool, each ``--help`` shows an example, and the
module paths keep working."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from dyjr_verl.__main__ import COMMANDS, main

REPO = Path(__file__).resolve().parents[1]


def test_usage_lists_every_command_with_an_example(capsys):
    assert main([]) == 0
    out = capsys.readouterr().out
    for name, cmd in COMMANDS.items():
        assert f"  {name} " in out and cmd.example in out


@pytest.mark.parametrize("name", list(COMMANDS))
def test_each_command_help_shows_its_options_and_an_example(name, capsys):
    with pytest.raises(SystemExit) as exc:
        main([name, "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"example: {COMMANDS[name].example}") and "usage:" in out


def test_unknown_command_is_one_line(capsys):
    assert main(["nope"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("dyjr-verl: error: unknown command 'nope'") and "\n" not in err


def test_console_script_and_module_paths_agree(tmp_path):
    script = shutil.which("dyjr-verl", path=str(Path(sys.executable).parent))
    assert script, "the dyjr-verl console script is not installed (pip install -e .)"
    via_script = subprocess.run([script, "recipes"], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    via_module = subprocess.run([sys.executable, "-m", "dyjr_verl", "recipes"], capture_output=True, text=True,
                                timeout=120, cwd=tmp_path)
    assert via_script.returncode == via_module.returncode == 0
    assert via_script.stdout == via_module.stdout and Path(via_script.stdout.strip()).is_dir()
    old = subprocess.run([sys.executable, "-m", "dyjr_verl.analysis.rank_k", "--help"], capture_output=True,
                         text=True, timeout=120, cwd=tmp_path)
    assert old.returncode == 0 and "usage:" in old.stdout
