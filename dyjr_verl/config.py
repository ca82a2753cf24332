"""Typed configuration for the top-level ``dyjr:`` node (and shared replay settings).

Why a top-level node: verl's dataclass nodes (``actor_rollout_ref.actor``, ``policy_loss``,
``algorithm``) reject unknown keys, so DyJR settings live under ``+dyjr.*`` on the driver and
reach the workers through the ``set_loss_fn`` partial (see ``dyjr_verl.losses.replay_loss``).

Validation happens once, at start-up, and reports *every* problem, one line per bad value,
each naming the full key path::

    ConfigError: invalid configuration (2 errors):
    dyjr.buffer.max_age must be >= 1, got 0
    dyjr.js.estimator: unknown key 'estimater' (did you mean 'estimator'?)

Extending (RLEP / Ex-GRPO nodes): subclass :class:`ConfigNode` as a ``@dataclass``, annotate
fields with ``int``/``float``/``bool``/``str``/``Literal[...]``/``Optional[...]``/a nested
``ConfigNode``, and override :meth:`ConfigNode.check` using the :class:`Checker` helpers.
``from_dict`` / ``from_omegaconf`` / ``validate`` then come for free, with the same error format.

Example YAML (all keys optional; these are the defaults)::

    dyjr:
      enable: true
      buffer: {max_age: 4, capacity: 4096, window: fixed, min_age: 1,
               drift_high: 0.2, drift_low: 0.05, shrink_step: 1, grow_step: 1, grow_patience: 2,
               admit: correct, admit_threshold: null, correct_threshold: 0.5}
      js: {coef: 0.1, divergence: js, estimator: sampled, topk_k: 8, log_u_clamp: 20.0, normalizer: separate}
      replay: {size: 0.125, min_buffer: 0, seed: 0}
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import typing
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal, Mapping, Optional, Union

__all__ = [
    "ConfigError",
    "Checker",
    "ConfigNode",
    "BufferConfig",
    "JSConfig",
    "ReplayConfig",
    "DyJRConfig",
    "DiagnosticsConfig",
]


class ConfigError(ValueError):
    """One or more invalid settings. ``errors`` holds one message per bad value."""

    def __init__(self, errors: list[str] | str):
        self.errors: list[str] = [errors] if isinstance(errors, str) else list(errors)
        n = len(self.errors)
        head = f"invalid configuration ({n} error{'s' if n != 1 else ''}):"
        super().__init__(head + "\n" + "\n".join(self.errors))


def _did_you_mean(word: str, choices: typing.Iterable[str]) -> str:
    close = difflib.get_close_matches(str(word), [str(c) for c in choices], n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


class Checker:
    """Collects validation errors for one node; every message starts with the key path.

    Fields whose *type* was already rejected while parsing are listed in ``bad`` and skipped by
    every range/cross-field helper, so one bad value produces exactly one line.
    """

    def __init__(self, path: str, errors: list[str], bad: frozenset[str] = frozenset()):
        self.path = path
        self.errors = errors
        self.bad = bad
        self.failed: set[str] = set()  # fields that failed a range rule in this pass

    def key(self, name: str) -> str:
        return f"{self.path}.{name}" if self.path else name

    def ok(self, *names: str) -> bool:
        """True when none of ``names`` failed parsing or an earlier rule (comparisons are meaningful)."""
        return not any(n in self.bad or n in self.failed for n in names)

    def error(self, name: str, message: str) -> None:
        """Record one line ``<path>.<name> <message>``; later cross-field rules skip ``name``."""
        self.failed.add(name)
        sep = "" if message.startswith(":") else " "
        self.errors.append(f"{self.key(name)}{sep}{message}")

    def ge(self, name: str, value: Any, lo: float) -> bool:
        if self.ok(name) and not value >= lo:
            self.error(name, f"must be >= {lo}, got {value!r}")
            return False
        return True

    def gt(self, name: str, value: Any, lo: float) -> bool:
        if self.ok(name) and not value > lo:
            self.error(name, f"must be > {lo}, got {value!r}")
            return False
        return True

    def le(self, name: str, value: Any, hi: float) -> bool:
        if self.ok(name) and not value <= hi:
            self.error(name, f"must be <= {hi}, got {value!r}")
            return False
        return True

    def finite(self, name: str, value: Any) -> bool:
        if self.ok(name) and isinstance(value, float) and not math.isfinite(value):
            self.error(name, f"must be a finite number, got {value!r}")
            return False
        return True


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, key: str, errors: list[str]) -> tuple[bool, Any]:
    """Parse ``value`` as annotation ``tp``. Returns (ok, parsed). Appends one error on failure."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is Union:
        if value is None and type(None) in args:
            return True, None
        non_none = [a for a in args if a is not type(None)]
        # Union[int, float]: keep ints as ints (row counts) and floats as floats (fractions).
        if set(non_none) == {int, float}:
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                errors.append(f"{key} must be an integer or a float, got {value!r}")
                return False, None
            return True, value
        if len(non_none) == 1:
            return _coerce(value, non_none[0], key, errors)
        errors.append(f"{key}: unsupported annotation {tp!r}")  # programming error in a node
        return False, None
    if origin is Literal:
        if value in args and isinstance(value, str):
            return True, value
        choices = ", ".join(repr(a) for a in args)
        errors.append(f"{key} must be one of {choices}, got {value!r}{_did_you_mean(str(value), args)}")
        return False, None
    if isinstance(tp, type) and issubclass(tp, ConfigNode):
        if value is None:
            return True, tp()
        if isinstance(value, tp):
            return True, value
        if not isinstance(value, Mapping):
            errors.append(f"{key} must be a mapping, got {type(value).__name__}")
            return False, None
        n_before = len(errors)
        node = tp._parse(value, key, errors)
        return len(errors) == n_before, node
    if tp is bool:
        if isinstance(value, bool):
            return True, value
        errors.append(f"{key} must be true or false, got {value!r}")
        return False, None
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return True, value
        errors.append(f"{key} must be an integer, got {value!r}")
        return False, None
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return True, float(value)
        errors.append(f"{key} must be a number, got {value!r}")
        return False, None
    if tp is str:
        if isinstance(value, str):
            return True, value
        errors.append(f"{key} must be a string, got {value!r}")
        return False, None
    errors.append(f"{key}: unsupported annotation {_type_name(tp)}")
    return False, None


@dataclass
class ConfigNode:
    """Base for typed config nodes: strict parsing, collected errors, dict round trip."""

    def check(self, c: Checker) -> None:
        """Range and cross-field rules; override in subclasses (type checks are automatic)."""

    # -- parsing -----------------------------------------------------------------------------
    @classmethod
    def _hints(cls) -> dict[str, Any]:
        return typing.get_type_hints(cls)

    @classmethod
    def _parse(cls, data: Mapping[str, Any], path: str, errors: list[str]) -> "ConfigNode":
        hints = cls._hints()
        names = [f.name for f in dataclasses.fields(cls)]
        kwargs: dict[str, Any] = {}
        bad: set[str] = set()
        for k in data:
            if k not in names:
                key = f"{path}.{k}" if path else str(k)
                errors.append(f"{key}: unknown key{_did_you_mean(str(k), names)}")
        for name in names:
            if name not in data:
                continue
            key = f"{path}.{name}" if path else name
            ok, parsed = _coerce(data[name], hints[name], key, errors)
            if ok:
                kwargs[name] = parsed
            else:
                bad.add(name)
        node = cls(**kwargs)  # bad fields keep their defaults; `bad` suppresses follow-up errors
        node._run_checks(path, errors, frozenset(bad))
        return node

    def _run_checks(self, path: str, errors: list[str], bad: frozenset[str]) -> None:
        self.check(Checker(path, errors, bad))

    def _validate_tree(self, path: str, errors: list[str]) -> None:
        for f in dataclasses.fields(self):
            child = getattr(self, f.name)
            if isinstance(child, ConfigNode):
                child._validate_tree(f"{path}.{f.name}" if path else f.name, errors)
        self._run_checks(path, errors, frozenset())

    # -- public API ----------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, data: Optional[Mapping[str, Any]] = None, path: Optional[str] = None):
        """Build and validate from a plain mapping; raises :class:`ConfigError` listing all errors."""
        path = cls.default_path if path is None else path
        errors: list[str] = []
        if data is None:
            data = {}
        if not isinstance(data, Mapping):
            raise ConfigError([f"{path} must be a mapping, got {type(data).__name__}"])
        node = cls._parse(data, path, errors)
        if errors:
            raise ConfigError(errors)
        return node

    @classmethod
    def from_omegaconf(cls, node: Any = None, path: Optional[str] = None):
        """Build from an OmegaConf node (``cfg.dyjr``); ``None`` or a missing node gives defaults."""
        if node is None:
            return cls.from_dict({}, path)
        from omegaconf import DictConfig, OmegaConf

        if isinstance(node, DictConfig):
            data = OmegaConf.to_container(node, resolve=True)
        else:
            data = node
        return cls.from_dict(data, path)  # type: ignore[arg-type]

    def validate(self, path: Optional[str] = None) -> "ConfigNode":
        """Re-check a node built in code (dataclass constructors do not validate). Returns self."""
        errors: list[str] = []
        self._validate_tree(self.default_path if path is None else path, errors)
        if errors:
            raise ConfigError(errors)
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    default_path: ClassVar[str] = ""


# ----------------------------------------------------------------------------------------------
# DyJR nodes
# ----------------------------------------------------------------------------------------------


@dataclass
class BufferConfig(ConfigNode):
    """Time-Sensitive Dynamic Buffer (see :mod:`dyjr_verl.replay.buffer` for exact semantics).

    max_age: largest window W in training steps; an entry pushed at step s is alive at step t
        iff ``t - s <= W``.
    capacity: hard bound on stored trajectories (oldest evicted first on overflow).
    window: ``fixed`` (W = max_age) or ``adaptive`` (W moves in [min_age, max_age] by drift).
    min_age: smallest window the adaptive rule may shrink to.
    drift_high / drift_low: adaptive thresholds on drift = mean |log pi_theta - stored| over
        replayed tokens; above ``drift_high`` W shrinks by ``shrink_step``; after
        ``grow_patience`` consecutive reports below ``drift_low`` W grows by ``grow_step``.
    admit: ``correct`` (reward > correct_threshold), ``all``, or ``threshold``
        (reward >= admit_threshold).
    """

    default_path: ClassVar[str] = "dyjr.buffer"

    max_age: int = 4
    capacity: int = 4096
    window: Literal["fixed", "adaptive"] = "fixed"
    min_age: int = 1
    drift_high: float = 0.2
    drift_low: float = 0.05
    shrink_step: int = 1
    grow_step: int = 1
    grow_patience: int = 2
    admit: Literal["correct", "all", "threshold"] = "correct"
    admit_threshold: Optional[float] = None
    correct_threshold: float = 0.5

    def check(self, c: Checker) -> None:
        c.ge("max_age", self.max_age, 1)
        c.ge("capacity", self.capacity, 1)
        c.ge("min_age", self.min_age, 1)
        if c.ok("min_age", "max_age") and self.min_age > self.max_age:
            c.error("min_age", f"must be <= {c.key('max_age')} ({self.max_age}), got {self.min_age}")
        if c.finite("drift_high", self.drift_high):
            c.gt("drift_high", self.drift_high, 0)
        if c.finite("drift_low", self.drift_low):
            c.ge("drift_low", self.drift_low, 0)
        if c.ok("drift_low", "drift_high") and self.drift_low >= self.drift_high:
            c.error("drift_low", f"must be < {c.key('drift_high')} ({self.drift_high}), got {self.drift_low}")
        c.ge("shrink_step", self.shrink_step, 1)
        c.ge("grow_step", self.grow_step, 1)
        c.ge("grow_patience", self.grow_patience, 1)
        c.finite("correct_threshold", self.correct_threshold)
        if self.admit_threshold is not None:
            c.finite("admit_threshold", self.admit_threshold)
        elif c.ok("admit", "admit_threshold") and self.admit == "threshold":
            c.error("admit_threshold", "must be set when admit is 'threshold'")


@dataclass
class JSConfig(ConfigNode):
    """The divergence regulariser on replayed tokens (see :mod:`dyjr_verl.losses.js`). The node
    keeps its name ``js`` for compatibility whichever divergence it selects.

    coef: lambda >= 0 multiplying the replay term.
    divergence: ``js`` (f_JS(u), estimating 2 JSD(pi_theta, pi_stored)) or ``forward_kl``
        (u - 1 - log u, estimating KL(pi_stored || pi_theta); DyJR's forward-KL variant). For
        small drift the KL term is about twice the JS one at the same coef.
    estimator: ``sampled`` (f_JS of the sampled token's probability ratio; unbiased, noisy) or
        ``topk`` (exact JS over the stored top-k support {top-k ids} + {rest}, recorded in the
        old-log-prob pass; needs that pass -- no rollout-correction bypass mode -- and the FSDP
        engine without fused kernels; see docs/topk.md).
    topk_k: ids per position stored with each trajectory for ``topk`` (``6k + 2`` bytes/token).
    log_u_clamp: log u = log pi_theta - stored is clamped to [-c, c] before f_JS; 20 matches
        verl's own ratio clamp and keeps f_JS finite (f_JS(e^20) ~ 3.4e8) in fp32 and bf16;
        gradients are zero beyond the clamp.
    normalizer: ``separate`` (replay tokens normalised by the replay-token count and fresh tokens
        by the fresh count of the mini-batch) or ``joint`` (verl's one count for both).
    """

    default_path: ClassVar[str] = "dyjr.js"

    coef: float = 0.1
    divergence: Literal["js", "forward_kl"] = "js"
    estimator: Literal["sampled", "topk"] = "sampled"
    topk_k: int = 8
    log_u_clamp: float = 20.0
    normalizer: Literal["separate", "joint"] = "separate"

    def check(self, c: Checker) -> None:
        if c.finite("coef", self.coef):
            c.ge("coef", self.coef, 0)
        if c.finite("log_u_clamp", self.log_u_clamp):
            c.gt("log_u_clamp", self.log_u_clamp, 0)
        c.ge("topk_k", self.topk_k, 1)
        if c.ok("divergence", "estimator") and self.estimator == "topk" and self.divergence != "js":
            c.error("divergence", f"{self.divergence} has no top-k estimator (the stored top-k record gives "
                    f"exact JS only): use {c.key('estimator')}=sampled, got estimator 'topk'")


@dataclass
class ReplayConfig(ConfigNode):
    """How many buffer rows join each training step (shared by DyJR, RLEP and Ex-GRPO nodes).

    size: an int >= 0 is a row count; a float in (0, 1] is a fraction of the fresh batch rows
        (YAML ``1`` means one row, ``1.0`` means the whole fresh batch).
    min_buffer: rows the buffer must hold before replay starts.
    seed: seed of the sampling RNG.
    """

    default_path: ClassVar[str] = "dyjr.replay"

    size: Union[int, float] = 0.125
    min_buffer: int = 0
    seed: int = 0

    def check(self, c: Checker) -> None:
        if c.ok("size"):
            if isinstance(self.size, float):
                if not (math.isfinite(self.size) and 0.0 < self.size <= 1.0):
                    c.error("size", f"as a fraction must be in (0, 1], got {self.size!r}")
            else:
                c.ge("size", self.size, 0)
        c.ge("min_buffer", self.min_buffer, 0)

    def num_rows(self, fresh_rows: int, multiple: int = 1) -> int:
        """Replay rows for a step with ``fresh_rows`` fresh rows, floored to ``multiple``.

        ``multiple`` lets the trainer keep the total a multiple of verl's required batch
        multiple (lcm(dp, ppo_mini_batch_size * n)).
        """
        if multiple < 1:
            raise ValueError(f"multiple must be >= 1, got {multiple}")
        n = int(math.floor(self.size * fresh_rows)) if isinstance(self.size, float) else int(self.size)
        return (n // multiple) * multiple


@dataclass
class DyJRConfig(ConfigNode):
    """The whole ``dyjr:`` node. ``DyJRConfig.from_omegaconf(cfg.get("dyjr"))`` at start-up."""

    default_path: ClassVar[str] = "dyjr"

    enable: bool = True
    buffer: BufferConfig = field(default_factory=BufferConfig)
    js: JSConfig = field(default_factory=JSConfig)
    replay: ReplayConfig = field(default_factory=ReplayConfig)


@dataclass
class DiagnosticsConfig(ConfigNode):
    """The top-level ``diagnostics:`` node, read by every dyjr_verl trainer mode (``sync_rank_k``
    for GRPO, ``dyjr``, ``rlep``, ``exgrpo``).

    rank_k: log ``rank_k/p1`` .. ``p{rank_k}``, ``rank_k/top{rank_k}_mass`` and ``rank_k/entropy``
        per step: the mean probability of the Rank-i token over the step's response positions,
        computed in verl's old-log-prob forward (no extra pass; absent in rollout-correction bypass
        mode, where that forward does not run). 0 turns it off.
    """

    default_path: ClassVar[str] = "diagnostics"

    rank_k: int = 8

    def check(self, c: Checker) -> None:
        c.ge("rank_k", self.rank_k, 0)
        if c.ok("rank_k") and self.rank_k > 64:
            c.error("rank_k", f"must be <= 64, got {self.rank_k}")
