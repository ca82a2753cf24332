"""Per-step metrics from verl's console logger (``step:N - key:value - ...`` lines).

``python -m verl.trainer.main_ppo ... | python -m dyjr_verl.analysis.steps [--log FILE]`` passes a
short progress line per step to the terminal, keeps the full log in FILE, and ends with a table of
the key metrics per step. Also used by the tests to read a finished run's log.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path
from typing import Iterable

_STEP = re.compile(r"(?:^|\s)step:(\d+) - (.*)$")
_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_NUMPY_SCALAR = re.compile(r"^np\.\w+\((.*)\)$")
# lines worth showing besides the step metrics: our start-up errors, verl's fatal errors, the end
_IMPORTANT = re.compile(r"^dyjr-verl: error|Error executing job|^\w*Error: |RayTaskError|Final validation metrics|Training Progress: 100%")

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


def parse_log(lines: Iterable[str]) -> dict[int, dict[str, float]]:
    """step -> metrics (a later line for the same step updates the earlier one)."""
    steps: dict[int, dict[str, float]] = {}
    for line in lines:
        parsed = parse_line(line)
        if parsed:
            steps.setdefault(parsed[0], {}).update(parsed[1])
    return steps


def table(steps: dict[int, dict[str, float]], keys: Iterable[str] = KEY_METRICS) -> str:
    keys = [k for k in keys if any(k in m for m in steps.values())]
    head = "| step | " + " | ".join(keys) + " |"
    rows = [head, "|" + "---|" * (len(keys) + 1)]
    for step in sorted(steps):
        cells = [f"{steps[step][k]:.4g}" if k in steps[step] else "" for k in keys]
        rows.append(f"| {step} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dyjr_verl.analysis.steps", description=__doc__)
    parser.add_argument("--log", type=Path, default=Path("runs/last_run.log"), help="where to keep the full log")
    parser.add_argument("--keys", nargs="*", default=list(KEY_METRICS))
    args = parser.parse_args(argv)
    args.log.parent.mkdir(parents=True, exist_ok=True)
    steps: dict[int, dict[str, float]] = {}
    with args.log.open("w") as log:
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
        print(f"no training step was logged; full log in {args.log}", file=sys.stderr)
        return 1
    print(f"\nper-step metrics (full log: {args.log}):\n{table(steps, args.keys)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
