"""The manifest: a SHA-256 digest of every sample's input, its label, and a digest of the whole dataset.

It may carry the data owner's Ed25519 signature (:mod:`robust_lightning.integrity.signing`).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from lightning.pytorch import LightningDataModule

from robust_lightning.data.fields import Key
from robust_lightning.data.validation import DataValidationError, SplitScan, scan_split, split_dataset
from robust_lightning.integrity import signing
from robust_lightning.integrity.diff import SplitDiff, diff_split

FORMAT = "robust-lightning-manifest/1"
SPLITS = ("train", "val", "test")


class IntegrityError(DataValidationError):
    """Raised when data differs from its manifest, or a manifest from its own digest. The message names the ids."""


Samples = Sequence[tuple[str, int]]


def _digest(splits: Mapping[str, Samples]) -> str:
    digest = hashlib.sha256()
    for name in sorted(splits):
        digest.update(f"{name}\n".encode())
        for sample_digest, label in splits[name]:
            digest.update(f"{sample_digest} {label}\n".encode())
    return digest.hexdigest()


@dataclass(frozen=True)
class Manifest:
    """Per split, one ``(SHA-256 of the sample's inputs, label)`` per sample id, in id order.

    The input digest covers every entry of a sample except its label, with its name, shape and
    dtype, so a changed pixel, a changed label, an added, removed or reordered sample, and the
    same bytes read under another dtype or entry name all show up in :meth:`verify`.
    :attr:`digest` fingerprints the whole dataset in one string, to publish beside the data.
    :meth:`signed` adds the data owner's signature, which :meth:`check_signature` verifies with
    the public key alone.

    Example:
        >>> import torch
        >>> from robust_lightning.data import scan_split
        >>> from torch.utils.data import TensorDataset
        >>> x, y = torch.rand(5, 3), torch.tensor([0, 1, 0, 1, 0])
        >>> manifest = Manifest.of({"train": scan_split("train", TensorDataset(x, y), num_classes=2)})
        >>> y[3] = 0
        >>> manifest.verify({"train": scan_split("train", TensorDataset(x, y), num_classes=2)})["train"].relabelled
        [(3, 1, 0)]
    """

    splits: Mapping[str, Samples]
    signature: dict[str, str] | None = None

    @classmethod
    def of(cls, scans: Mapping[str, SplitScan]) -> Manifest:
        return cls({name: list(zip(scan.digests, scan.labels.tolist())) for name, scan in scans.items()})

    @property
    def digest(self) -> str:
        return _digest(self.splits)

    def signed(self, private_key: str | Path) -> Manifest:
        """This manifest signed with the Ed25519 private key at ``private_key`` (``keygen``'s private.pem)."""
        return replace(self, signature=signing.sign(self._message, signing.load_private_key(private_key)))

    def check_signature(self, public_key: str | Path, source: str = "given") -> None:
        """Raise :class:`IntegrityError` unless the owner of ``public_key`` signed exactly this content."""
        try:
            key = signing.load_public_key(public_key)
        except ValueError as error:
            raise IntegrityError(str(error)) from None
        problem = signing.signature_problem(self._message, self.signature, key)
        if problem is not None:
            raise IntegrityError(
                f"The manifest {source} is refused: {problem}. Fix: have the data owner sign it with the private "
                f"key that goes with {public_key} (robust-lightning-manifest create PATH --key private.pem)."
            )

    @property
    def _message(self) -> bytes:
        # The digest covers every split, id, sample digest and label: signing it signs them all.
        return f"{FORMAT}\n{self.digest}\n".encode()

    def require_splits(self, names: Iterable[str], source: str = "given") -> None:
        """Raise :class:`IntegrityError` naming each of ``names`` that the manifest does not record."""
        missing = [name for name in names if name not in self.splits]
        if missing:
            raise IntegrityError(
                f"The manifest {source} records no {', '.join(missing)} split, which the data has (it records: "
                f"{', '.join(sorted(self.splits)) or 'nothing'}). A partial manifest would let changes to those "
                "splits through. Fix: create the manifest anew from trusted data (robust-lightning-manifest create)."
            )

    def verify(self, scans: Mapping[str, SplitScan]) -> dict[str, SplitDiff]:
        """The differences of each scanned split that the manifest records; splits it lacks are not judged."""
        return self.compare(Manifest.of(scans))

    def compare(self, current: Manifest) -> dict[str, SplitDiff]:
        """The differences of each split of ``current`` that this manifest records."""
        return {
            name: diff_split(self.splits[name], samples)
            for name, samples in current.splits.items()
            if name in self.splits
        }

    def save(self, path: str | Path) -> None:
        splits = {
            name: [{"id": i, "sha256": d, "label": label} for i, (d, label) in enumerate(samples)]
            for name, samples in self.splits.items()
        }
        document = {"format": FORMAT, "digest": self.digest, "splits": splits}
        if self.signature is not None:
            document["signature"] = self.signature
        Path(path).write_text(json.dumps(document, indent=0))

    @classmethod
    def load(cls, path: str | Path) -> Manifest:
        try:
            document = json.loads(Path(path).read_text())
            if not isinstance(document, dict) or document.get("format") != FORMAT:
                found = document.get("format") if isinstance(document, dict) else type(document).__name__
                raise ValueError(f"its format is {found!r}, not {FORMAT!r}")
            manifest = cls(
                {
                    name: [(s["sha256"], int(s["label"])) for s in sorted(samples, key=lambda s: s["id"])]
                    for name, samples in document["splits"].items()
                },
                document.get("signature"),
            )
            stored = document["digest"]
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
            raise IntegrityError(
                f"Cannot read the manifest {path}: {error}. Fix: pass the file written by "
                "`robust-lightning-manifest create` (or Manifest.save)."
            ) from error
        emptied = [name for name, samples in manifest.splits.items() if not samples]
        if not manifest.splits or emptied:
            what = f"the {', '.join(emptied)} split" if emptied else "any split"
            raise IntegrityError(
                f"The manifest {path} records no samples of {what}: an emptied manifest verifies nothing. "
                "Fix: restore it from where it was published, or create it anew from trusted data."
            )
        if manifest.digest != stored:
            raise IntegrityError(
                f"The manifest {path} does not match its own digest: it was edited or corrupted. "
                "Fix: restore it from where it was published, or create it anew from trusted data."
            )
        return manifest


def mismatch_message(diffs: Mapping[str, SplitDiff], source: str) -> str:
    """One error text for every split that differs from the manifest at ``source``."""
    lines = [f"{name}: {line}" for name, diff in diffs.items() for line in diff.describe()]
    return (
        f"The data differs from the manifest {source}:\n- "
        + "\n- ".join(lines)
        + "\nFix: restore the data from a trusted source; if the change is intended, create the manifest anew "
        "(robust-lightning-manifest create)."
    )


def build_manifest(
    datamodule: LightningDataModule, num_classes: int, target_key: Key | None = None, progress: bool = True
) -> Manifest:
    """Set up ``datamodule`` and record each of its train, val and test splits that it has.

    Example:
        >>> from robust_lightning.data import DigitsDataModule
        >>> manifest = build_manifest(DigitsDataModule(), num_classes=10, progress=False)
        >>> {name: len(samples) for name, samples in manifest.splits.items()}
        {'train': 1293, 'val': 144, 'test': 360}
    """
    datamodule.setup("fit")
    datamodule.setup("test")
    scans = {}
    for split in SPLITS:
        dataset = split_dataset(datamodule, split)
        if dataset is not None:
            scans[split] = scan_split(split, dataset, num_classes, target_key, check=False, progress=progress)
    return Manifest.of(scans)
