"""Data integrity: a SHA-256 manifest of every sample and its label, signed by the data owner, and a verification
that names each change."""

from robust_lightning.integrity.diff import SplitDiff, diff_split
from robust_lightning.integrity.manifest import IntegrityError, Manifest, build_manifest
from robust_lightning.integrity.signing import generate_keys

__all__ = ["IntegrityError", "Manifest", "SplitDiff", "build_manifest", "diff_split", "generate_keys"]
