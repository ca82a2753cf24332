"""Per-step metrics of a verl run: from the ``file`` logger's JSON lines, or from console text.

The recipes log ``trainer.logger=[console, file]``. verl's ``file`` backend
(``verl.utils.tracking.FileLogger``) writes one line per ``Tracking.log`` call,
``{"step": N, "data": {"actor/pg_loss": ..., ...}}``, to ``$VERL_FILE_LOGGER_PATH``, or when that is
unset to ``$VERL_FILE_LOGGER_ROOT/<trainer.project_name>/<trainer.experiment_name>.jsonl`` (root
``.``, the trainer's working directory), truncating an existing file. The experiment launcher and
the tests set ``VERL_FILE_LOGGER_PATH=<run dir>/metrics.jsonl`` (:func:`file_logger_env`). Add wandb
with ``trainer.logger='[console,file,wandb]'``.

:func:`read_steps` reads either kind of file, told apart by content: JSON lines, or verl's console
text (``step:N - key:value - ...`` with ANSI codes, Ray prefixes and ``np.float64(x)``), kept for logs
from before the file logger. Values are floats; ``null`` (orjson's NaN and inf) reads as NaN, and
strings and lists are left out, as in the console. A line of a JSON-lines file that is not a
``{"step", "data"}`` record is an error naming the file and line (:class:`StepsError`), never
skipped: a truncated metrics file must not pass for a shorter run.

    python -m dyjr_verl.analysis.steps RUN_DIR/metrics.jsonl        # table of a finished run
    python -m verl.trainer.main_ppo ... | python -m dyjr_verl.analysis.steps [--log FILE]

The second form passes a short progress line per step to the terminal, keeps the full console log in
FILE, and ends with a table of the key metrics per step.
"""

from __future__ import annotations

import argparse
import gzip
import math
import re
import sys
from pathlib import Path
from typing import Iterable

from dyjr_verl.jsonlines import json_lines

Steps = dict[int, dict[str, float]]

METRICS_FILE = "metrics.jsonl"
FILE_LOGGER_ENV = "VERL_FILE_LOGGER_PATH"  # read by verl.utils.tracking.FileLogger

_STEP = re.compile(r"(?:^|\s)step:(\d+) - (.*)$")
_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_NUMPY_SCALAR = re.compile(r"^np\.\w+\((.*)\)$")
# lines worth showing besides the step metrics: our start-up errors, verl's fatal errors, the end
_IMPORTANT = re.compile(r"^dyjr-verl: error|Error executing job|^\w*Error: |RayTaskError|Final validation metrics|Training Progress: 100%")


class StepsError(ValueError):
    """A metrics file that cannot be read: the message names the file (and line)."""


def file_logger_env(run_dir: Path) -> dict[str, str]:
    """Environment for ``main_ppo`` that puts the file logger's JSON lines at ``run_dir/metrics.jsonl``
    (verl's default path depends on the trainer's working directory and the project name)."""
    return {FILE_LOGGER_ENV: str(Path(run_dir).resolve() / METRICS_FILE)}


KEY_METRICS = (
    "critic/score/mean",
    "actor/pg_loss",
    "actor/grad_norm",
    "training/rollout_probs_diff_mean",
    "dyjr/buffer/size",
    "dyjr/replay/rows",
    "actor/replay/term",
    "actor/replay/u_mean",
    "response_length/mean",
    "timing_s/step",
)


def parse_line(line: str) -> tuple[int, dict[str, float]] | None:
    m = _STEP.search(_ANSI.sub("", line.rstrip("\n")))
    if not m:
        return None
    metrics: dict[str, float] = {}
    for item in m.group(2).split(" - "):
        key, sep, value = item.rpartition(":")
        if not sep:
            continue
        value = _NUMPY_SCALAR.sub(r"\1", value.strip())  # pprint shows numpy scalars as np.float64(0.5)
        try:
            metrics[key.strip()] = float(value)
        except ValueError:
            continue
    return int(m.group(1)), metrics


def parse_log(lines: Iterable[str]) -> Steps:
    """step -> metrics from console text (a later line for the same step updates the earlier one)."""
    steps: Steps = {}
    for line in lines:
        parsed = parse_line(line)
        if parsed:
            steps.setdefault(parsed[0], {}).update(parsed[1])
    return steps


def _number(value) -> float | None:
    if value is None:
        return math.nan  # orjson writes NaN and +-inf as null
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    return None  # strings, lists: not a metric (the console parser drops them too)


def parse_jsonl(lines: Iterable[str], source: str = "<lines>") -> Steps:
    """step -> metrics from the file logger's ``{"step": N, "data": {...}}`` lines (several lines of
    one step merge, as in verl's console). Raises :class:`StepsError` at the first bad line."""
    steps: Steps = {}
    hint = "; a run killed mid-write leaves a truncated last line"
    for i, record in json_lines(lines, source, StepsError, hint):
        if not (isinstance(record, dict) and isinstance(record.get("step"), int)
                and isinstance(record.get("data"), dict)):
            raise StepsError(f'{source}:{i}: not a file-logger record {{"step": N, "data": {{...}}}}')
        metrics = {k: v for k, v in ((k, _number(v)) for k, v in record["data"].items()) if v is not None}
        steps.setdefault(record["step"], {}).update(metrics)
    return steps


def is_jsonl(lines: list[str]) -> bool:
    """The file logger's JSON lines (first non-blank line is a JSON object), not console text."""
    first = next((line for line in lines if line.strip()), "")
    return first.lstrip().startswith("{")


def parse_steps(lines: list[str], source: str = "<lines>") -> Steps:
    return parse_jsonl(lines, source) if is_jsonl(lines) else parse_log(lines)


def read_lines(path: Path) -> list[str]:
    path = Path(path)
    if not path.is_file():
        raise StepsError(f"{path}: no such file")
    if path.suffix == ".gz":
        with gzip.open(path, "rt", errors="replace") as f:
            return f.read().splitlines()
    return path.read_text(errors="replace").splitlines()


def read_steps(path: Path) -> Steps:
    """step -> metrics of a run from its ``metrics.jsonl`` or, for old runs, its console log
    (either may be gzipped, ``.gz``); told apart by content."""
    return parse_steps(read_lines(path), str(path))


def table(steps: dict[int, dict[str, float]], keys: Iterable[str] = KEY_METRICS) -> str:
    keys = [k for k in keys if any(k in m for m in steps.values())]
    head = "| step | " + " | ".join(keys) + " |"
    rows = [head, "|" + "---|" * (len(keys) + 1)]
    for step in sorted(steps):
        cells = [f"{steps[step][k]:.4g}" if k in steps[step] else "" for k in keys]
        rows.append(f"| {step} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dyjr_verl.analysis.steps", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("file", nargs="?", type=Path,
                        help="a finished run's metrics.jsonl (or console log); without it, read console text from stdin")
    parser.add_argument("--log", type=Path, help="stdin mode: where to keep the full log (default runs/last_run.log)")
    parser.add_argument("--keys", nargs="*", default=list(KEY_METRICS))
    args = parser.parse_args(argv)
    if args.file is not None:
        if args.log is not None:
            parser.error("--log is for stdin mode; a FILE is read, not written")
        try:
            steps = read_steps(args.file)
        except StepsError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        if not steps:
            print(f"no training step in {args.file}", file=sys.stderr)
            return 1
        print(table(steps, args.keys))
        return 0
    log_path = args.log or Path("runs/last_run.log")
    log_path.parent.mkdir(parents=True, exist_ok=True)
    steps: Steps = {}
    with log_path.open("w") as log:
        for line in sys.stdin:
            log.write(line)
            parsed = parse_line(line)
            if parsed:
                step, metrics = parsed
                steps.setdefault(step, {}).update(metrics)
                brief = ", ".join(f"{k}={metrics[k]:.4g}" for k in args.keys if k in metrics)
                print(f"step {step}: {brief}", flush=True)
            elif _IMPORTANT.search(line):
                print(_ANSI.sub("", line.rstrip()), flush=True)
    if not steps:
        print(f"no training step was logged; full log in {log_path}", file=sys.stderr)
        return 1
    print(f"\nper-step metrics (full log: {log_path}):\n{table(steps, args.keys)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
