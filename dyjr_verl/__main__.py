"""``python -m dyjr_verl <command>``: doctor | recipes."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def recipes_dir() -> Path:
    """Absolute directory of the shipped hydra recipes (use as ``--config-path``)."""
    import dyjr_verl.recipes as recipes

    return Path(recipes.__path__[0]).resolve()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dyjr_verl")
    sub = parser.add_subparsers(dest="cmd", required=True)
    sub.add_parser("doctor", help="check the install: versions, platform, registered components")
    sub.add_parser("recipes", help="print the recipes directory (for --config-path)")
    args = parser.parse_args(argv)
    if args.cmd == "doctor":
        from dyjr_verl.doctor import run

        return run()
    print(recipes_dir())
    return 0


if __name__ == "__main__":
    sys.exit(main())
