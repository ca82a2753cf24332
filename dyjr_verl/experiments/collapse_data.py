"""Word problems for the SmolLM2 collapse experiment (issue 15): train / val / test parquet files.

    python -m dyjr_verl.experiments.collapse_data --out DIR [--seed 0] [--two-step-share 0.25]

The problems are the embedded arithmetic generator's (``dyjr_verl.assets.tasks.arithmetic_problems``:
one- and two-operation buy / give-away questions, numbers 1-9), drawn once with a fixed seed and cut
into disjoint splits (distinct question texts): ``val`` (settings are chosen on it), ``train``, ``test``
(never looked at while choosing). The instruction is the tiny task's short one; SmolLM2-135M-Instruct
still never writes ``\\boxed{}`` (docs/smollm2.md) but states the answer in prose ("so he has 3 + 5 = 8
apples."), so the recipe scores the final stated number (``dyjr_verl.rewards.final_number``). A quarter
of the problems are two-step: the base model almost never solves those at T = 1, which keeps greedy
accuracy moderate (results/collapse/search.md has the measurements and the instructions tried).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from dyjr_verl.assets.tasks import ARITH_DATA_SOURCE, arithmetic_problems
from dyjr_verl.data.schema import make_row, write_parquet

INSTRUCTION = "Put the final answer in \\boxed{}."
SPLITS = {"val": 64, "train": 448, "test": 128}  # sizes, drawn in this order from one stream


def build(out: Path, seed: int = 0, two_step_share: float = 0.25, instruction: str = INSTRUCTION) -> dict[str, Path]:
    if not 0.0 <= two_step_share <= 1.0:
        raise ValueError(f"--two-step-share must be in [0, 1], got {two_step_share}")
    problems = arithmetic_problems(sum(SPLITS.values()), seed=seed, two_step_share=two_step_share)
    paths, start = {}, 0
    for split, n in SPLITS.items():
        rows = [make_row(data_source=ARITH_DATA_SOURCE, prompt=f"{p.question} {instruction}", ability="math",
                         ground_truth=str(p.answer), split=split, index=i,
                         extra={"question": p.question, "steps": p.solution.count("=")})
                for i, p in enumerate(problems[start:start + n])]
        paths[split] = write_parquet(rows, out / f"{split}.parquet")
        start += n
    (out / "MANIFEST.json").write_text(json.dumps({"seed": seed, "two_step_share": two_step_share,
                                                   "instruction": instruction, "splits": SPLITS}, indent=1))
    return paths


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dyjr_verl.experiments.collapse_data", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--two-step-share", type=float, default=0.25)
    parser.add_argument("--instruction", default=INSTRUCTION)
    args = parser.parse_args(argv)
    try:
        paths = build(args.out, args.seed, args.two_step_share, args.instruction)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for split, path in paths.items():
        print(f"{split}: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
