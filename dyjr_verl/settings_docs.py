"""Everything written from the method config dataclasses, so that their defaults live only there.

* The settings tables in ``README.md`` and ``docs/*.md``: a block between
  ``<!-- settings:NODE begin … -->`` and ``<!-- settings:NODE end -->`` (NODE a dotted node path such
  as ``dyjr``, ``dyjr.js`` or ``exgrpo``) is a table of every setting under NODE: key, type, default,
  description. A description is the field's ``metadata["help"]`` or else its entry in the class
  docstring (``name: text`` lines, the convention of the config modules).
* The recipes' default bodies ``recipes/_defaults_<node>.yaml``: the whole node with its defaults.
  Hydra composes recipes in struct mode, so a key absent from the composed config cannot be
  overridden without ``+``; including the body keeps every key overridable while the recipes state
  only the keys they change.

``python -m dyjr_verl.settings_docs`` rewrites both in place; ``--check`` rewrites nothing and exits 1
with one line per stale file.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import re
import sys
import typing
from pathlib import Path
from typing import Any, Literal, Union

import yaml

ROOT = Path(__file__).resolve().parents[1]
RECIPES = Path(__file__).resolve().parent / "recipes"
DEFAULTS_PREFIX = "_defaults_"
BLOCK = re.compile(r"(<!-- settings:(?P<node>[\w.]+) begin[^>]*-->\n)(?P<body>.*?)(<!-- settings:(?P=node) end -->)",
                   re.DOTALL)
_ENTRY = re.compile(r"(?P<names>[a-z_][\w.]*(?:\s*[/,]\s*[a-z_][\w.]*)*):\s+(?P<text>.*)")


def method_nodes() -> dict[str, type]:
    """Top-level hydra node -> its config dataclass: every method's, and ``diagnostics``. The only
    place this module names config modules."""
    from dyjr_verl.diagnostics.config import DiagnosticsConfig
    from dyjr_verl.methods import METHODS

    return {**{m.config_node: m.config_cls() for m in METHODS.values()}, "diagnostics": DiagnosticsConfig}


# -- descriptions ----------------------------------------------------------------------------------


def _docstring_entries(cls: type) -> dict[str, str]:
    """``name: text`` entries of a class docstring (continuation lines indented); ``a / b:`` and
    ``a, b:`` give both names the same text."""
    entries: dict[str, str] = {}
    names: list[str] = []
    for line in inspect.cleandoc(cls.__doc__ or "").splitlines():
        match = _ENTRY.fullmatch(line)
        if match:
            names = re.split(r"\s*[/,]\s*", match["names"])
            for name in names:
                entries[name] = match["text"]
        elif names and line.startswith((" ", "\t")):
            for name in names:
                entries[name] += " " + line.strip()
        else:
            names = []
    return entries


def _markdown(text: str) -> str:
    text = re.sub(r":\w+:`~?([^`]+)`", r"`\1`", text)  # :mod:`x` / :class:`x` -> `x`
    return text.replace("``", "`").replace("|", r"\|")


def _description(chain: list[type], path: list[str], f: dataclasses.Field) -> str:
    """help metadata, else the outermost docstring entry naming this key (``replay.size`` in the
    parent's docstring beats ``size`` in ReplayConfig's, whose text is about DyJR)."""
    if "help" in f.metadata:
        return f.metadata["help"]
    for i, cls in enumerate(chain):
        text = _docstring_entries(cls).get(".".join(path[i:]))
        if text:
            return text
    raise ValueError(f"{chain[-1].__name__}.{f.name} has no description: add a `{f.name}:` line to the class "
                     f"docstring or metadata={{'help': ...}} to the field")


# -- rows --------------------------------------------------------------------------------------------


def _type_text(tp: Any) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Literal:
        return " / ".join(f"`{a}`" for a in args)
    if origin is Union:
        return " or ".join("null" if a is type(None) else _type_text(a) for a in args)
    return getattr(tp, "__name__", str(tp))


def _yaml_text(value: Any) -> str:
    return yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()


def rows(cls: type, node: Any = None, chain: tuple[type, ...] = (), path: tuple[str, ...] = ()):
    """(dotted key under the node, type, default, description) of every leaf setting, in field order."""
    node = cls() if node is None else node  # an instance: default_factory values (Ex-GRPO's replay.size)
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        value = getattr(node, f.name)
        if dataclasses.is_dataclass(value):
            yield from rows(type(value), value, chain + (cls,), path + (f.name,))
        else:
            key = path + (f.name,)
            yield ".".join(key), _type_text(hints[f.name]), _yaml_text(value), _description([*chain, cls], list(key), f)


def _node_class(node_path: str) -> tuple[type, Any]:
    top, *rest = node_path.split(".")
    nodes = method_nodes()
    if top not in nodes:
        raise ValueError(f"settings:{node_path}: no such node; known: {', '.join(nodes)}")
    node = nodes[top]()
    for name in rest:
        node = getattr(node, name, None)
        if not dataclasses.is_dataclass(node):
            raise ValueError(f"settings:{node_path}: {name!r} is not a node of {top}")
    return type(node), node


def table(node_path: str) -> str:
    cls, node = _node_class(node_path)
    lines = ["| key | type | default | description |", "|---|---|---|---|"]
    lines += [f"| `{k}` | {t} | `{d}` | {_markdown(text)} |" for k, t, d, text in rows(cls, node)]
    return "\n".join(lines) + "\n"


def defaults_yaml(name: str) -> str:
    cls = method_nodes()[name]
    body = yaml.safe_dump({name: dataclasses.asdict(cls())}, sort_keys=False, default_flow_style=False)
    return ("# @package _global_\n"
            f"# Generated from {cls.__name__} by `python -m dyjr_verl.settings_docs`: do not edit.\n"
            f"# Every {name}: key with its default, so that overrides need no `+`; a recipe includes this\n"
            f"# body and states only the keys it changes.\n{body}")


# -- files -------------------------------------------------------------------------------------------


def render(path: Path) -> str:
    """What ``path`` should contain now."""
    if path.suffix == ".yaml":
        name = path.stem.removeprefix(DEFAULTS_PREFIX)
        if name not in method_nodes():
            raise ValueError(f"{path}: not a default body (want {DEFAULTS_PREFIX}<node>.yaml, node one of "
                             f"{', '.join(method_nodes())})")
        return defaults_yaml(name)
    text = path.read_text()
    if len(BLOCK.findall(text)) != text.count("<!-- settings:") // 2 or text.count("<!-- settings:") % 2:
        raise ValueError(f"{path}: a <!-- settings:NODE begin --> marker without its matching end marker")
    return BLOCK.sub(lambda m: m[1] + table(m["node"]) + m[4], text)


def default_paths() -> list[Path]:
    docs = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    return [p for p in docs if p.exists()] + [RECIPES / f"{DEFAULTS_PREFIX}{n}.yaml" for n in method_nodes()]


def _shown(path: Path) -> str:
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="dyjr-verl settings-docs",
        description="Regenerate the settings tables in the docs (<!-- settings:NODE begin/end --> blocks) and the "
                    "recipes' _defaults_<node>.yaml from the config dataclasses.")
    parser.add_argument("paths", nargs="*", type=Path, help="files to process (default: README.md, docs/*.md, "
                        "the recipes' default bodies)")
    parser.add_argument("--check", action="store_true", help="change nothing; exit 1 naming each stale file")
    args = parser.parse_args(argv)
    stale = []
    try:
        for path in args.paths or default_paths():
            current = path.read_text() if path.exists() else None
            wanted = render(path)
            if current == wanted:
                continue
            if args.check:
                stale.append(path)
            else:
                path.write_text(wanted)
                print(f"updated {_shown(path)}")
    except (OSError, ValueError) as e:
        print(f"dyjr-verl: error: {e}", file=sys.stderr)
        return 2
    for path in stale:
        print(f"dyjr-verl: {_shown(path)} is stale: run `python -m dyjr_verl.settings_docs`", file=sys.stderr)
    return 1 if stale else 0


if __name__ == "__main__":
    sys.exit(main())
