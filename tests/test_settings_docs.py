"""The docs' settings tables and the recipes' default bodies are generated from the config dataclasses
(dyjr_verl.settings_docs): the repository's copies are current, and a stale one is caught."""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from dyjr_verl import settings_docs
from dyjr_verl.settings_docs import main, method_nodes, rows

REPO = Path(__file__).resolve().parents[1]


def test_repository_copies_are_current(capsys):
    assert main(["--check"]) == 0, capsys.readouterr().err


def test_every_node_is_documented_and_has_a_default_body():
    settings = (REPO / "docs" / "settings.md").read_text()
    for name in method_nodes():
        assert f"<!-- settings:{name} begin" in settings
        assert (settings_docs.RECIPES / f"_defaults_{name}.yaml").exists()


def test_a_stale_doc_block_is_reported_and_rewritten(tmp_path, capsys):
    doc = tmp_path / "settings.md"
    shutil.copy(REPO / "docs" / "settings.md", doc)
    good = doc.read_text()
    row = "| `buffer.max_age` | int | `4` |"
    assert row in good
    doc.write_text(good.replace(row, "| `buffer.max_age` | int | `5` |"))
    assert main(["--check", str(doc)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(doc) in err[0] and "stale" in err[0]
    assert "`5`" in doc.read_text()  # --check changes nothing
    assert main([str(doc)]) == 0 and doc.read_text() == good


def test_a_stale_default_body_is_reported(tmp_path, capsys):
    body = tmp_path / "_defaults_rlep.yaml"
    body.write_text((settings_docs.RECIPES / "_defaults_rlep.yaml").read_text().replace("replay_per_group: 2",
                                                                                       "replay_per_group: 3"))
    assert main(["--check", str(body)]) == 1
    assert str(body) in capsys.readouterr().err


@pytest.mark.parametrize(("text", "message"), [
    ("<!-- settings:nosuch begin -->\n<!-- settings:nosuch end -->\n", "settings:nosuch: no such node"),
    ("<!-- settings:dyjr.nosuch begin -->\n<!-- settings:dyjr.nosuch end -->\n", "'nosuch' is not a node of dyjr"),
    ("<!-- settings:dyjr begin -->\n| old |\n", "without its matching end marker"),
])
def test_bad_markers_are_one_error_line(tmp_path, capsys, text, message):
    doc = tmp_path / "x.md"
    doc.write_text(text)
    assert main(["--check", str(doc)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("dyjr-verl: error:") and message in err[0]


@dataclass
class _Inner:
    """Inner node.

    lo / hi: the range,
        inclusive.
    """

    lo: int = 0
    hi: int = field(default=9, metadata={"help": "upper end"})


@dataclass
class _Outer:
    """Outer node.

    inner.lo: the outer's own words win.
    """

    inner: _Inner = field(default_factory=_Inner)
    flag: bool = field(default=False, metadata={"help": "a switch"})


@dataclass
class _Undocumented:
    """No entries."""

    x: int = 1


def test_rows_read_docstring_entries_and_help_metadata():
    assert list(rows(_Outer)) == [("inner.lo", "int", "0", "the outer's own words win."),
                                  ("inner.hi", "int", "9", "upper end"),
                                  ("flag", "bool", "false", "a switch")]
    assert settings_docs._docstring_entries(_Inner) == {"lo": "the range, inclusive.", "hi": "the range, inclusive."}
    with pytest.raises(ValueError, match="_Undocumented.x has no description"):
        list(rows(_Undocumented))
