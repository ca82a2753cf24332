"""A trainer run split across launches ("segments") that resumes from verl's latest checkpoint.

verl resumes by itself with ``trainer.resume_mode=auto``: it reads ``latest_checkpointed_iteration.txt``
in ``trainer.default_local_dir`` and continues from ``global_step_<c>`` (model, optimizer, data-loader
position; our replay trainers add their store). Two things are left to the launcher:

* **Metrics.** verl's FileLogger opens ``$VERL_FILE_LOGGER_PATH`` with ``"wb"``, so a relaunch would
  erase the steps logged so far. Each launch therefore logs to its own ``metrics.<n>.jsonl``
  (:func:`segment_path`), and :func:`merge_segments` rebuilds the run: a segment resumed from
  checkpoint ``c`` logs from step ``c + 1`` on, so every entry of an earlier segment from its first
  step on belongs to a continuation that was thrown away (steps after the last checkpoint are redone)
  and is replaced by the later segment's.
* **Where a segment stops.** :func:`segment_end`: the whole run when there is no time budget, else
  the largest number of whole checkpoint quanta that fits in the time left (so the segment ends on a
  checkpoint and loses nothing); no segment when not one quantum fits.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

from dyjr_verl.analysis.steps import Steps, StepsError, parse_jsonl, read_lines

#: verl's checkpoint tracker (verl.utils.checkpoint.checkpoint_manager.get_checkpoint_tracker_filename)
TRACKER_FILE = "latest_checkpointed_iteration.txt"
_SEGMENT = re.compile(r"^metrics\.(\d+)\.jsonl(?:\.gz)?$")


def segment_path(run_dir: Path, n: int) -> Path:
    return run_dir / f"metrics.{n}.jsonl"


def segment_paths(run_dir: Path) -> list[Path]:
    """The run's metric segments (plain or gzipped), in launch order."""
    found = [(int(m.group(1)), p) for p in run_dir.glob("metrics.*.jsonl*") if (m := _SEGMENT.match(p.name))]
    return [p for _, p in sorted(found)]


def next_segment(run_dir: Path) -> int:
    paths = segment_paths(run_dir)
    return int(_SEGMENT.match(paths[-1].name).group(1)) + 1 if paths else 0


def read_segment(path: Path) -> tuple[Steps, bool]:
    """(steps, whether a truncated last line was dropped). A launch killed mid-write can leave half a
    last line; anything else that does not parse is an error (:class:`StepsError`)."""
    lines = [line for line in read_lines(path) if line.strip()]
    try:
        return parse_jsonl(lines, str(path)), False
    except StepsError:
        if not lines:
            raise
        return parse_jsonl(lines[:-1], str(path)), True  # raises again when the damage is not the last line


def merge_segments(paths: list[Path]) -> tuple[Steps, list[str]]:
    """step -> metrics of the whole run, and warnings (truncated last lines). A later segment replaces
    every entry of the earlier ones from its own first step on."""
    merged: Steps = {}
    warnings = []
    for path in paths:
        steps, truncated = read_segment(path)
        if truncated:
            warnings.append(f"{path.name}: dropped a truncated last line (the launch was killed while writing it)")
        if not steps:
            continue
        first = min(steps)
        merged = {s: m for s, m in merged.items() if s < first}
        merged.update(steps)
    return dict(sorted(merged.items())), warnings


def latest_checkpoint(ckpt_dir: Path) -> int:
    """The step verl's ``resume_mode=auto`` continues from (0: none, the run starts from scratch). Same
    rule as verl's ``find_latest_ckpt_path``: the tracker file names the step, and its folder must exist."""
    tracker = ckpt_dir / TRACKER_FILE
    if not tracker.is_file():
        return 0
    text = tracker.read_text().strip()
    if not text.isdigit() or not (ckpt_dir / f"global_step_{text}").is_dir():
        return 0
    return int(text)


def segment_end(start: int, total: int, quantum: int, *, remaining_s: float | None = None, step_s: float = 0.0,
                overhead_s: float = 0.0, finish_s: float = 0.0) -> int:
    """Last step of the next segment of a run whose latest checkpoint is ``start`` (``start`` itself: do
    not launch). Without a budget (``remaining_s`` None): ``total``. With one: ``total`` when the rest of
    the run fits (``step_s`` per step + ``overhead_s`` start-up and validations + ``finish_s`` for the
    final evaluation), else the last multiple of ``quantum`` (the checkpoint interval, or a multiple
    of it) that the time left pays for."""
    if quantum < 1:
        raise ValueError(f"quantum must be >= 1, got {quantum}")
    if start >= total:
        return start
    if remaining_s is None or (total - start) * step_s + overhead_s + finish_s <= remaining_s:
        return total
    affordable = math.floor(max(0.0, remaining_s - overhead_s) / (max(step_s, 1e-9) * quantum))
    return min(total, max(start, (start // quantum + affordable) * quantum))
