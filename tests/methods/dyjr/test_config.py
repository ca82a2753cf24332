"""``dyjr:`` config node: defaults, one error line per bad value naming its key, unknown keys."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

import pytest
from omegaconf import OmegaConf

from dyjr_verl.config import (
    BufferConfig,
    Checker,
    ConfigError,
    ConfigNode,
    DyJRConfig,
    JSConfig,
    ReplayConfig,
)


def errors_of(d: dict) -> list[str]:
    with pytest.raises(ConfigError) as info:
        DyJRConfig.from_dict(d)
    err = info.value
    assert isinstance(err, ValueError)
    lines = str(err).splitlines()
    assert lines[1:] == err.errors  # header line, then exactly one line per error
    return err.errors


def test_defaults_are_valid():
    cfg = DyJRConfig.from_dict({})
    assert cfg == DyJRConfig() and cfg.validate() is cfg
    assert cfg.enable is True
    assert cfg.buffer.window == "fixed" and cfg.buffer.admit == "correct" and cfg.buffer.correct_threshold == 0.5
    assert cfg.js.coef == 0.1 and cfg.js.estimator == "sampled" and cfg.js.log_u_clamp == 20.0
    assert DyJRConfig.from_dict(None) == cfg and DyJRConfig.from_omegaconf(None) == cfg
    assert DyJRConfig.from_dict(cfg.to_dict()) == cfg  # dict round trip


def test_from_omegaconf_and_overrides():
    node = OmegaConf.create(
        {"enable": False, "buffer": {"max_age": 8, "window": "adaptive"}, "js": {"coef": 0}, "replay": {"size": 64}}
    )
    cfg = DyJRConfig.from_omegaconf(node)
    assert cfg.enable is False and cfg.buffer.max_age == 8 and cfg.buffer.window == "adaptive"
    assert cfg.js.coef == 0.0 and isinstance(cfg.js.coef, float)
    assert cfg.replay.size == 64 and isinstance(cfg.replay.size, int)


@pytest.mark.parametrize(
    "d, key, fragment",
    [
        ({"buffer": {"max_age": 0}}, "dyjr.buffer.max_age", "must be >= 1, got 0"),
        ({"buffer": {"capacity": -5}}, "dyjr.buffer.capacity", "must be >= 1"),
        ({"buffer": {"max_age": 2.5}}, "dyjr.buffer.max_age", "must be an integer"),
        ({"buffer": {"max_age": True}}, "dyjr.buffer.max_age", "must be an integer"),
        ({"buffer": {"window": "sliding"}}, "dyjr.buffer.window", "must be one of 'fixed', 'adaptive'"),
        ({"buffer": {"min_age": 5, "max_age": 3}}, "dyjr.buffer.min_age", "must be <= dyjr.buffer.max_age"),
        ({"buffer": {"min_age": 0}}, "dyjr.buffer.min_age", "must be >= 1"),
        ({"buffer": {"drift_low": 0.5, "drift_high": 0.2}}, "dyjr.buffer.drift_low", "must be < dyjr.buffer.drift_high"),
        ({"buffer": {"drift_high": 0}}, "dyjr.buffer.drift_high", "must be > 0"),
        ({"buffer": {"admit": "correct_only"}}, "dyjr.buffer.admit", "must be one of"),
        ({"buffer": {"admit": "threshold"}}, "dyjr.buffer.admit_threshold", "must be set"),
        ({"buffer": {"correct_threshold": "high"}}, "dyjr.buffer.correct_threshold", "must be a number"),
        ({"buffer": {"grow_patience": 0}}, "dyjr.buffer.grow_patience", "must be >= 1"),
        ({"js": {"coef": -0.1}}, "dyjr.js.coef", "must be >= 0"),
        ({"js": {"coef": float("inf")}}, "dyjr.js.coef", "finite"),
        ({"js": {"topk_k": 0}}, "dyjr.js.topk_k", "must be >= 1"),
        ({"js": {"estimator": "full"}}, "dyjr.js.estimator", "must be one of 'sampled', 'topk'"),
        ({"js": {"log_u_clamp": 0}}, "dyjr.js.log_u_clamp", "must be > 0"),
        ({"js": {"normalizer": "both"}}, "dyjr.js.normalizer", "must be one of"),
        ({"replay": {"size": -1}}, "dyjr.replay.size", "must be >= 0"),
        ({"replay": {"size": 1.5}}, "dyjr.replay.size", "must be in (0, 1]"),
        ({"replay": {"size": 0.0}}, "dyjr.replay.size", "must be in (0, 1]"),
        ({"replay": {"size": "all"}}, "dyjr.replay.size", "must be an integer or a float"),
        ({"replay": {"min_buffer": -1}}, "dyjr.replay.min_buffer", "must be >= 0"),
        ({"enable": "yes"}, "dyjr.enable", "must be true or false"),
        ({"buffer": 3}, "dyjr.buffer", "must be a mapping"),
    ],
)
def test_each_bad_value_gives_one_line_naming_its_key(d, key, fragment):
    errs = errors_of(d)
    assert len(errs) == 1, errs
    assert errs[0].startswith(key) and fragment in errs[0], errs[0]


def test_unknown_keys_with_did_you_mean():
    errs = errors_of({"buffer": {"max_agee": 3}, "jss": {}, "replay": {"zzz": 1}})
    assert "dyjr.buffer.max_agee: unknown key (did you mean 'max_age'?)" in errs
    assert "dyjr.jss: unknown key (did you mean 'js'?)" in errs
    assert "dyjr.replay.zzz: unknown key" in errs
    assert len(errs) == 3


def test_all_errors_are_collected_one_per_line():
    errs = errors_of(
        {
            "buffer": {"max_age": 0, "capacity": 0, "window": "adaptiv"},
            "js": {"coef": -1, "estimator": "topk", "topk_k": 0},
            "replay": {"size": 2.0},
            "enabel": True,
        }
    )
    assert len(errs) == 7
    assert any("did you mean 'adaptive'" in e for e in errs)
    assert any(e.startswith("dyjr.enabel: unknown key (did you mean 'enable'?)") for e in errs)


def test_validate_on_directly_built_nodes_uses_key_paths():
    with pytest.raises(ConfigError) as info:
        DyJRConfig(buffer=BufferConfig(max_age=0), js=JSConfig(coef=-1.0)).validate()
    assert info.value.errors == ["dyjr.buffer.max_age must be >= 1, got 0", "dyjr.js.coef must be >= 0, got -1.0"]
    with pytest.raises(ConfigError, match=r"^invalid configuration \(1 error\):\ndyjr.replay.size"):
        ReplayConfig(size=-3).validate("dyjr.replay")


def test_replay_num_rows():
    assert ReplayConfig(size=16).num_rows(256) == 16
    assert ReplayConfig(size=0.125).num_rows(256) == 32
    assert ReplayConfig(size=0.1).num_rows(100, multiple=8) == 8  # 10 floored to a multiple of 8
    assert ReplayConfig(size=1).num_rows(256) == 1 and ReplayConfig(size=1.0).num_rows(256) == 256


def test_nodes_are_reusable_by_other_methods():
    """An RLEP-style node reuses ConfigError, the parser and the Checker helpers."""

    @dataclass
    class RLEPNode(ConfigNode):
        default_path: ClassVar[str] = "rlep"
        replay_per_prompt: int = 2
        mode: Literal["uniform", "recent"] = "uniform"
        replay: ReplayConfig = None  # type: ignore[assignment]

        def check(self, c: Checker) -> None:
            c.ge("replay_per_prompt", self.replay_per_prompt, 0)

    node = RLEPNode.from_dict({"replay_per_prompt": 3, "replay": {"size": 4}})
    assert node.replay_per_prompt == 3 and node.replay.size == 4
    with pytest.raises(ConfigError) as info:
        RLEPNode.from_dict({"replay_per_prompt": -1, "mode": "recnt", "replay": {"seed": "x"}})
    assert info.value.errors == [
        "rlep.mode must be one of 'uniform', 'recent', got 'recnt' (did you mean 'recent'?)",
        "rlep.replay.seed must be an integer, got 'x'",
        "rlep.replay_per_prompt must be >= 0, got -1",
    ]


def test_diagnostics_node():
    from dyjr_verl.diagnostics.config import DiagnosticsConfig

    assert DiagnosticsConfig.from_dict({}).rank_k == 8
    assert DiagnosticsConfig.from_dict({"rank_k": 0}).rank_k == 0
    with pytest.raises(ConfigError) as info:
        DiagnosticsConfig.from_dict({"rank_k": 65, "rankk": 1})
    assert sorted(info.value.errors) == [
        "diagnostics.rank_k must be <= 64, got 65",
        "diagnostics.rankk: unknown key (did you mean 'rank_k'?)",
    ]
