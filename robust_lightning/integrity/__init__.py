"""Data integrity: a SHA-256 manifest of every sample and its label, and a verification that names each change."""

from robust_lightning.integrity.diff import SplitDiff, diff_split
from robust_lightning.integrity.manifest import IntegrityError, Manifest, build_manifest

__all__ = ["IntegrityError", "Manifest", "SplitDiff", "build_manifest", "diff_split"]
