"""``dyjr-verl <command> …`` (or ``python -m dyjr_verl <command> …``): every tool of the package in
one CLI. Each command is also its module (``python -m dyjr_verl.eval …`` keeps working); ``dyjr-verl
<command> --help`` prints that module's options and an example."""

from __future__ import annotations

import importlib
import sys
from typing import NamedTuple


class Command(NamedTuple):
    module: str  # a module with ``main(argv) -> int``
    summary: str
    example: str


COMMANDS: dict[str, Command] = {
    "doctor": Command("dyjr_verl.doctor", "check the install: versions, platform, components, recipes",
                      "dyjr-verl doctor"),
    "recipes": Command("dyjr_verl.recipes", "print the recipes directory (for main_ppo --config-path)",
                       'python -m verl.trainer.main_ppo --config-path "$(dyjr-verl recipes)" --config-name dyjr_math …'),
    "plan": Command("dyjr_verl.plan", "per-step plan of a recipe on a cluster shape (no Ray, no weights)",
                    "dyjr-verl plan --config-name dyjr_math data.train_files=t.parquet data.val_files=v.parquet "
                    "trainer.nnodes=8 --json"),
    "data-math": Command("dyjr_verl.data.math", "math data (MATH-500, AIME, AMC, DAPO-Math-17k, …) -> verl parquet",
                         "dyjr-verl data-math --input aime25.jsonl --output aime25.parquet"),
    "data-sql": Command("dyjr_verl.data.sql", "Spider / BIRD questions + SQLite DBs -> verl parquet",
                        "dyjr-verl data-sql --input spider/ --split dev --output spider_dev.parquet"),
    "eval": Command("dyjr_verl.eval.__main__", "greedy / mean@k / maj@k / pass@k of a model or checkpoint",
                    "dyjr-verl eval --model ckpt/global_step_200 --data aime25=aime25.parquet --samples 32 --out results/eval"),
    "rlep-collect": Command("dyjr_verl.methods.rlep.collect", "RLEP phase 1: sample and verify an experience pool",
                            "dyjr-verl rlep-collect --model HF_DIR --data train.parquet --out pool.parquet --n 64"),
    "rlep-import": Command("dyjr_verl.methods.rlep.importer", "RLEP: import the released experience pool",
                           "dyjr-verl rlep-import --input released.parquet --out pool.parquet"),
    "rank-k": Command("dyjr_verl.analysis.rank_k", "Rank-1..k probability + entropy over steps, from training logs",
                      "dyjr-verl rank-k grpo.log dyjr.log --labels GRPO DyJR --out rank_k.png"),
    "steps": Command("dyjr_verl.analysis.steps", "per-step metrics table from a training log",
                     "python -m verl.trainer.main_ppo … | dyjr-verl steps --log run.log"),
    "report": Command("dyjr_verl.analysis.report", "the miniature reproduction's report and plots",
                      "dyjr-verl report --runs results/mini/runs --out results/mini"),
    "assets": Command("dyjr_verl.assets.__main__", "build the tiny offline model, tokenizer and tasks",
                      "dyjr-verl assets build"),
    "mini": Command("dyjr_verl.experiments.mini", "the miniature reproduction (methods x seeds, resumable)",
                    "dyjr-verl mini run --dry-run"),
    "settings-docs": Command("dyjr_verl.settings_docs", "regenerate the docs' settings tables and the recipes' "
                             "default bodies from the config dataclasses", "dyjr-verl settings-docs --check"),
}


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = ["usage: dyjr-verl <command> [options]   (or python -m dyjr_verl <command>)", "", "commands:"]
    lines += [f"  {name:<{width}}  {cmd.summary}" for name, cmd in COMMANDS.items()]
    lines += ["", "examples:"] + [f"  {cmd.example}" for cmd in COMMANDS.values()]
    lines += ["", "dyjr-verl <command> --help: that command's options"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"dyjr-verl: error: unknown command {name!r}; one of: {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    cmd = COMMANDS[name]
    if rest[:1] in (["-h"], ["--help"]):
        print(f"example: {cmd.example}\n")
    return int(importlib.import_module(cmd.module).main(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
