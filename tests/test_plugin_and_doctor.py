"""The verl plugin: installed as an entry point, light, lazy, idempotent, loud; and `doctor`."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from importlib.metadata import entry_points

import pytest


def _py(code: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          timeout=300, env={**os.environ, **env})


def test_entry_point_is_installed():
    assert "dyjr_verl.plugin" in [ep.value for ep in entry_points(group="verl.plugins")]


def test_import_verl_is_light_and_registration_is_lazy():
    out = _py(
        """
        import sys, verl
        heavy = [m for m in ("verl.trainer.ppo.v1", "vllm", "dyjr_verl.replay.update_strategy")
                 if m in sys.modules]
        print("heavy", heavy)
        from verl.trainer.ppo.v1.trainer_base import TRAINER_REGISTRY      # triggers the hook
        from verl.trainer.ppo.core_algos import POLICY_LOSS_REGISTRY
        print("registered", "dyjr" in TRAINER_REGISTRY, "dyjr_js" in POLICY_LOSS_REGISTRY)
        import dyjr_verl.plugin as p
        p.load(); p.load()                                                # idempotent
        print("errors", p.LOAD_ERRORS)
        """
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "heavy []" in out.stdout
    assert "registered True True" in out.stdout
    assert "errors []" in out.stdout


def test_plugin_failure_is_loud(tmp_path):
    # a provider that cannot be imported must print an ERROR on stderr and be reported by doctor
    out = _py(
        """
        import dyjr_verl.plugin as p
        from dyjr_verl.plugin import Component, _register
        _register(Component("trainer", "broken", "dyjr_verl.does_not_exist", "x"))()
        print("errors", len(p.LOAD_ERRORS))
        """
    )
    assert "errors 1" in out.stdout
    assert "ERROR dyjr_verl plugin: failed to register trainer 'broken'" in out.stderr


def test_doctor_is_green():
    out = subprocess.run([sys.executable, "-m", "dyjr_verl", "doctor"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr[-3000:]
    for line in ("verl platform: cpu", "trainer      dyjr", "policy_loss  dyjr_js", "doctor: all green"):
        assert line in out.stdout, out.stdout


def test_doctor_fails_when_a_component_is_missing():
    out = _py(
        """
        import sys
        import dyjr_verl.plugin as p
        p.COMPONENTS = p.COMPONENTS + (p.Component("trainer", "not_registered_anywhere", "dyjr_verl.plugin", None),)
        from dyjr_verl.doctor import run
        sys.exit(run())
        """
    )
    assert out.returncode == 1
    assert "error: trainer 'not_registered_anywhere' is not registered" in out.stderr


@pytest.mark.parametrize("first", ["dyjr_verl.replay.update_strategy", "dyjr_verl.methods.rlep.trainer",
                                   "dyjr_verl.methods.exgrpo.trainer", "dyjr_verl.replay.group_strategy",
                                   "dyjr_verl.diagnostics.trainer", "dyjr_verl.methods.dyjr.trainer"])
def test_registration_survives_importing_our_trainer_modules_first(first):
    # Importing a trainer module before verl's v1 package used to run the registration hook while
    # replay_trainer was half initialised: rlep/exgrpo failed to register (a circular import).
    out = _py(
        f"""
        import {first}
        from verl.trainer.ppo.v1.trainer_base import TRAINER_REGISTRY
        import dyjr_verl.plugin as p
        print("modes", sorted(m for m in ("dyjr", "rlep", "exgrpo") if m in TRAINER_REGISTRY), len(p.LOAD_ERRORS))
        """
    )
    assert "modes ['dyjr', 'exgrpo', 'rlep'] 0" in out.stdout, (first, out.stdout, out.stderr[-2000:])
