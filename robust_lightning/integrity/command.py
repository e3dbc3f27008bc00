"""The ``robust-lightning-manifest`` command: create or verify the manifest of a configured dataset."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from hydra import compose, initialize_config_dir
from hydra.errors import HydraException
from hydra.utils import instantiate

from robust_lightning.data.validation import DataValidationError
from robust_lightning.integrity.manifest import IntegrityError, Manifest, build_manifest, mismatch_message

_EPILOG = """examples:
  robust-lightning-manifest create digits.manifest.json
  robust-lightning-manifest verify digits.manifest.json
  robust-lightning-manifest create mnist.json data=mnist data.root=/data/mnist

Train against a manifest with:  robust-lightning +robust.manifest=digits.manifest.json
"""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="robust-lightning-manifest",
        description="Record a SHA-256 digest and the label of every sample (create), or check data against "
        "such a record and name every changed, relabelled, added, removed or moved sample (verify).",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("action", choices=("create", "verify"))
    parser.add_argument("path", help="the manifest file (JSON)")
    parser.add_argument(
        "overrides", nargs="*", help="Hydra overrides choosing the data, as for robust-lightning (default: digits)"
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``robust-lightning-manifest`` console script; returns the exit status."""
    from robust_lightning.cli import CONFIG_DIR, check_keys, register_recipes

    args = _parser().parse_args(argv)
    register_recipes()
    try:
        with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
            cfg = compose("config", overrides=list(args.overrides))
        check_keys(cfg)
    except (HydraException, ValueError) as error:
        print(f"robust-lightning-manifest: {error}", file=sys.stderr)
        return 2
    try:
        current = build_manifest(instantiate(cfg.data), cfg.num_classes, cfg.robust.get("target_key"))
    except DataValidationError as error:
        print(f"robust-lightning-manifest: {error}", file=sys.stderr)
        return 2
    if args.action == "create":
        current.save(args.path)
        counts = ", ".join(f"{name} {len(samples)}" for name, samples in current.splits.items())
        print(f"Wrote {args.path}: {counts} samples; dataset digest {current.digest}")
        return 0
    try:
        recorded = Manifest.load(args.path)
    except IntegrityError as error:
        print(error, file=sys.stderr)
        return 2
    diffs = {name: diff for name, diff in recorded.compare(current).items() if diff}
    missing = sorted(set(recorded.splits) - set(current.splits))
    if diffs or missing:
        message = mismatch_message(diffs, args.path) if diffs else ""
        if missing:
            message += f"\nSplits recorded in the manifest but absent from the data: {missing}."
        print(message.strip(), file=sys.stderr)
        return 1
    print(f"OK: the data matches {args.path} (dataset digest {current.digest}).")
    return 0
