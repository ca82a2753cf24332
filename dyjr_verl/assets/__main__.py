"""``python -m dyjr_verl.assets build [--root DIR] [--seed N] [--force]``."""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import fields
from pathlib import Path

from dyjr_verl.assets.build import AssetSpec, build, default_assets_dir


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dyjr_verl.assets", description=__doc__)
    sub = parser.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="build the tiny model, tokenizer and datasets (offline, seconds)")
    b.add_argument("--root", type=Path, default=None, help=f"output dir (default {default_assets_dir()})")
    b.add_argument("--force", action="store_true", help="rebuild even if an identical build exists")
    for f in fields(AssetSpec):
        b.add_argument(f"--{f.name.replace('_', '-')}", type=type(f.default), default=f.default)
    sub.add_parser("path", help="print the default assets directory")
    args = parser.parse_args(argv)
    if args.cmd == "path":
        print(default_assets_dir())
        return 0
    spec = AssetSpec(**{f.name: getattr(args, f.name) for f in fields(AssetSpec)})
    t0 = time.perf_counter()
    root = build(args.root, spec, force=args.force)
    manifest = json.loads((root / "MANIFEST.json").read_text())
    print(f"assets ready in {root} ({time.perf_counter() - t0:.1f}s): "
          f"{manifest['num_parameters']} params, vocab {manifest['vocab_size']}, rows {manifest['rows']}, "
          f"warm-start loss {manifest['warm_start_loss_first_last']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
