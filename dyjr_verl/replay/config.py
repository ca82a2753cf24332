"""Typed, validated config nodes: the machinery every method node uses, and the shared ``replay`` node.

Why top-level nodes (``dyjr:``, ``rlep:``, ``exgrpo:``, ``diagnostics:``): verl's dataclass nodes
(``actor_rollout_ref.actor``, ``policy_loss``, ``algorithm``) reject unknown keys, so method settings
live under ``+<node>.*`` on the driver and reach the workers through the ``set_loss_fn`` partial.

Validation happens once, at start-up, and reports *every* problem, one line per bad value,
each naming the full key path::

    ConfigError: invalid configuration (2 errors):
    dyjr.buffer.max_age must be >= 1, got 0
    dyjr.js.estimator: unknown key 'estimater' (did you mean 'estimator'?)

A node: subclass :class:`ConfigNode` as a ``@dataclass``, annotate fields with
``int``/``float``/``bool``/``str``/``Literal[...]``/``Optional[...]``/a nested ``ConfigNode``, and
override :meth:`ConfigNode.check` using the :class:`Checker` helpers. ``from_dict`` /
``from_omegaconf`` / ``validate`` then come for free, with the same error format; a node whose
settings depend on the rest of verl's config overrides :meth:`ConfigNode.verl_problems`.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import typing
from dataclasses import dataclass
from typing import Any, ClassVar, Literal, Mapping, Optional, Union

__all__ = ["ConfigError", "Checker", "ConfigNode", "ReplayConfig", "critic_free_problems", "replay_setting", "run_seed"]


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
        """Build from an OmegaConf node (e.g. ``cfg.dyjr``); ``None`` or a missing node gives defaults."""
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

    def verl_problems(self, config: Any) -> list[str]:
        """One line per setting of this (parsed) node that contradicts the rest of verl's config."""
        return []

    def verl_warnings(self, config: Any) -> list[str]:
        """One line per setting of this (parsed) node that runs but works against the method with the
        rest of verl's config (``plan`` and start-up print them)."""
        return []

    default_path: ClassVar[str] = ""


# ----------------------------------------------------------------------------------------------
# the shared replay node
# ----------------------------------------------------------------------------------------------


@dataclass
class ReplayConfig(ConfigNode):
    """How many buffer rows join each training step (shared by the method nodes).

    size: an int >= 0 is a row count; a float in (0, 1] is a fraction of the fresh batch rows
        (YAML ``1`` means one row, ``1.0`` means the whole fresh batch).
    min_buffer: rows the buffer must hold before replay starts.
    seed: seed of the replay sampling RNG; null derives it from the run's seed (``data.seed``, else
        ``actor_rollout_ref.rollout.seed``), so runs with different seeds replay different rows.
    resume_empty: a resume from a verl checkpoint without replay state starts with an empty store
        (and a warning); false refuses it, because the resumed run would silently differ from an
        uninterrupted one.
    """

    default_path: ClassVar[str] = "replay"

    size: Union[int, float] = 0.125
    min_buffer: int = 0
    seed: Optional[int] = None
    resume_empty: bool = False

    def check(self, c: Checker) -> None:
        if c.ok("size"):
            if isinstance(self.size, float):
                if not (math.isfinite(self.size) and 0.0 < self.size <= 1.0):
                    c.error("size", f"as a fraction must be in (0, 1], got {self.size!r}")
            else:
                c.ge("size", self.size, 0)
        c.ge("min_buffer", self.min_buffer, 0)
        if self.seed is not None:
            c.ge("seed", self.seed, 0)  # numpy seeds are non-negative

    def num_rows(self, fresh_rows: int, multiple: int = 1) -> int:
        """Replay rows for a step with ``fresh_rows`` fresh rows, floored to ``multiple``.

        ``multiple`` lets the trainer keep the total a multiple of verl's required batch
        multiple (lcm(dp, ppo_mini_batch_size * n)).
        """
        if multiple < 1:
            raise ValueError(f"multiple must be >= 1, got {multiple}")
        n = int(math.floor(self.size * fresh_rows)) if isinstance(self.size, float) else int(self.size)
        return (n // multiple) * multiple


def replay_setting(method_config: ConfigNode, name: str, node: str) -> tuple[Any, str]:
    """(value, full key) of one of a method's replay settings (``seed``, ``resume_empty``) in its
    parsed config node ``node``: on its ``replay:`` child when it has one (``dyjr.replay.seed``),
    else on the method node itself (``rlep.seed``)."""
    replay = getattr(method_config, "replay", None)
    if isinstance(replay, ReplayConfig):
        return getattr(replay, name), f"{node}.replay.{name}"
    return getattr(method_config, name), f"{node}.{name}"


def run_seed(config: Any) -> tuple[int, str]:
    """(seed, key) of the run in verl 0.9.1's config, which has no ``trainer.seed``: ``data.seed`` (its
    only run-level seed, the data shuffle), else ``actor_rollout_ref.rollout.seed`` (vLLM sampling)."""
    from omegaconf import OmegaConf

    for key in ("data.seed", "actor_rollout_ref.rollout.seed"):
        value = OmegaConf.select(config, key, default=None)
        if value is not None:
            return int(value), key
    return 0, "no seed in the config"


def critic_free_problems(name: str, config: Any) -> list[str]:
    """Rows replayed inside their prompt's group need a critic-free group advantage estimator."""
    from omegaconf import OmegaConf

    estimator = str(OmegaConf.select(config, "algorithm.adv_estimator", default="grpo"))
    if estimator == "gae" or bool(OmegaConf.select(config, "critic.enable", default=False)):
        return [f"{name}: replayed rows join their prompt's group, which needs a critic-free group estimator "
                f"(e.g. algorithm.adv_estimator=grpo), got adv_estimator={estimator}"]
    return []
