"""``python -m dyjr_verl <command>``: doctor | recipes | plan."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dyjr_verl")
    sub = parser.add_subparsers(dest="cmd", required=True)
    sub.add_parser("doctor", help="check the install: versions, platform, registered components")
    sub.add_parser("recipes", help="print the recipes directory (for --config-path)")
    sub.add_parser("plan", help="per-step plan of a recipe on a cluster shape (python -m dyjr_verl plan -h)",
                   add_help=False)
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["plan"]:  # its own parser: hydra overrides follow the options
        from dyjr_verl.plan import main as plan_main

        return plan_main(argv[1:])
    args = parser.parse_args(argv)
    if args.cmd == "doctor":
        from dyjr_verl.doctor import run

        return run()
    from dyjr_verl.recipes import recipes_dir

    print(recipes_dir())
    return 0


if __name__ == "__main__":
    sys.exit(main())
