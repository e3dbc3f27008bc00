"""The ``robust-lightning-manifest`` command: make a key pair, create (and sign) or verify a dataset's manifest."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from hydra import compose, initialize_config_dir
from hydra.errors import HydraException
from hydra.utils import instantiate

from robust_lightning.config import CONFIG_DIR, check_config, register_recipes
from robust_lightning.data.validation import DataValidationError
from robust_lightning.integrity.manifest import IntegrityError, Manifest, build_manifest, mismatch_message
from robust_lightning.integrity.signing import generate_keys

_EPILOG = """examples:
  robust-lightning-manifest create digits.manifest.json
  robust-lightning-manifest verify digits.manifest.json
  robust-lightning-manifest create mnist.json data=mnist data.root=/data/mnist

signed by the data owner, verified by training with the public key only:
  robust-lightning-manifest keygen keys/
  robust-lightning-manifest create digits.manifest.json --key keys/private.pem
  robust-lightning-manifest verify digits.manifest.json --public-key keys/public.pem
  robust-lightning +robust.manifest=digits.manifest.json +robust.public_key=keys/public.pem
"""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="robust-lightning-manifest",
        description="Record a SHA-256 digest and the label of every sample (create), or check data against "
        "such a record and name every changed, relabelled, added, removed or moved sample (verify).",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    actions = parser.add_subparsers(dest="action", required=True)
    keygen = actions.add_parser("keygen", help="write an Ed25519 key pair: DIR/private.pem and DIR/public.pem")
    keygen.add_argument("folder", metavar="DIR")
    for action, option, text in (
        ("create", "--key", "sign the manifest with this private key (keygen's private.pem)"),
        ("verify", "--public-key", "refuse a manifest not signed for this public key (keygen's public.pem)"),
    ):
        command = actions.add_parser(action, help=f"{action} the manifest of the configured data")
        command.add_argument("path", help="the manifest file (JSON)")
        command.add_argument(option, help=text)
        command.add_argument(
            "overrides", nargs="*", help="Hydra overrides choosing the data, as for robust-lightning (default: digits)"
        )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``robust-lightning-manifest`` console script; returns the exit status."""
    args = _parser().parse_args(argv)
    try:
        if args.action == "keygen":
            private, public = generate_keys(args.folder)
            print(f"Wrote {private} (keep it with the data owner) and {public} (give it to training).")
            return 0
        current = _current_manifest(args.overrides)
        if args.action == "create":
            return _create(current, args.path, args.key)
        return _verify(current, args.path, args.public_key)
    except (HydraException, DataValidationError, ValueError, OSError) as error:
        print(f"robust-lightning-manifest: {error}", file=sys.stderr)
        return 2


def _current_manifest(overrides: list[str]) -> Manifest:
    register_recipes()
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose("config", overrides=list(overrides))
    check_config(cfg)
    return build_manifest(instantiate(cfg.data), cfg.num_classes, cfg.robust.get("target_key"))


def _create(current: Manifest, path: str, key: str | None) -> int:
    manifest = current.signed(key) if key else current
    manifest.save(path)
    counts = ", ".join(f"{name} {len(samples)}" for name, samples in current.splits.items())
    signed = "signed, " if key else ""
    print(f"Wrote {path}: {counts} samples; {signed}dataset digest {current.digest}")
    return 0


def _verify(current: Manifest, path: str, public_key: str | None) -> int:
    try:
        recorded = Manifest.load(path)
        if public_key:
            recorded.check_signature(public_key, path)
        recorded.require_splits(current.splits, path)
    except IntegrityError as error:
        print(error, file=sys.stderr)
        return 1
    diffs = {name: diff for name, diff in recorded.compare(current).items() if diff}
    missing = sorted(set(recorded.splits) - set(current.splits))
    if diffs or missing:
        message = mismatch_message(diffs, path) if diffs else ""
        if missing:
            message += f"\nSplits recorded in the manifest but absent from the data: {missing}."
        print(message.strip(), file=sys.stderr)
        return 1
    signed = ", signed by the given key" if public_key else ""
    print(f"OK: the data matches {path}{signed} (dataset digest {current.digest}).")
    return 0
