"""One pass over a split: check every sample, read its label and fingerprint its inputs.

Samples are read one at a time, rather than through the user's DataLoader, so that a
sample with a wrong shape is named by its id instead of breaking ``collate``.
"""

from __future__ import annotations

import hashlib
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from lightning.pytorch import LightningDataModule
from lightning_utilities.core.overrides import is_overridden
from rich.progress import track
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from robust_lightning.data.fields import Key, get_field, resolve_key
from robust_lightning.report.table import format_table

_SHOWN_IDS = 10


class DataValidationError(ValueError):
    """Raised when a split holds samples that training must not see. The message names the ids."""

    @classmethod
    def of(cls, problems: list[str]) -> DataValidationError:
        return cls("Data validation failed:\n- " + "\n- ".join(problems))


@dataclass
class SplitScan:
    """What one pass over a split found: labels, one SHA-256 digest of the inputs per sample."""

    name: str
    labels: Tensor
    digests: list[str]
    problems: list[str] = field(default_factory=list)


def _ids_text(ids: Sequence[int]) -> str:
    shown = ", ".join(str(i) for i in ids[:_SHOWN_IDS])
    more = f" and {len(ids) - _SHOWN_IDS} more" if len(ids) > _SHOWN_IDS else ""
    return f"{len(ids)} sample(s) (ids {shown}{more})"


def _leaves(structure: Any, path: str = "") -> list[tuple[str, Any]]:
    if isinstance(structure, Mapping):
        return [leaf for k, v in structure.items() for leaf in _leaves(v, f"{path}[{k!r}]")]
    if isinstance(structure, (tuple, list)):
        return [leaf for i, v in enumerate(structure) for leaf in _leaves(v, f"{path}[{i}]")]
    return [(path, structure)]


def _as_tensor(value: Any) -> Tensor | None:
    """The leaf as a CPU tensor, or None for what has no numeric form (strings, paths, None, objects)."""
    if isinstance(value, Tensor):
        return value.detach().cpu()
    if isinstance(value, (str, bytes)):
        return None
    try:
        # Contiguous, because torch refuses the negative strides of flipped arrays (img[..., ::-1]).
        return torch.as_tensor(np.ascontiguousarray(np.asarray(value)))
    except (TypeError, ValueError, RuntimeError):
        return None


def _opaque_bytes(value: Any) -> bytes:
    """Full content of a leaf with no numeric form; repr alone would abbreviate a long array."""
    return repr(value.tolist() if isinstance(value, np.ndarray) else value).encode()


def _all_finite(tensor: Tensor) -> bool:
    try:
        return bool(torch.isfinite(tensor).all())
    except (NotImplementedError, RuntimeError):  # e.g. float8 has no isfinite kernel
        return bool(torch.isfinite(tensor.float()).all())


def _raw_bytes(tensor: Tensor) -> bytes:
    # Through uint8, because numpy has no bfloat16 or float8.
    dense = tensor.to_dense() if tensor.layout != torch.strided else tensor
    return dense.resolve_conj().resolve_neg().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def _label_of(sample: Any, key: Key) -> int | None:
    try:
        tensor = _as_tensor(get_field(sample, key))
    except (KeyError, IndexError, TypeError):  # a sample that lacks the label is reported by id
        return None
    if tensor is None or tensor.numel() != 1 or tensor.dtype == torch.bool:
        return None
    if tensor.is_floating_point() or tensor.is_complex():
        return None
    return int(tensor.item())


class _SplitChecker:
    """Collects the problems of one split while its samples stream past."""

    def __init__(self, name: str, num_classes: int, key: Key) -> None:
        self.name, self.num_classes, self.key = name, num_classes, key
        self.non_finite: dict[str, list[int]] = defaultdict(list)
        self.bad_labels: list[int] = []
        self.signatures: dict[str, dict[tuple, list[int]]] = defaultdict(lambda: defaultdict(list))
        self.structures: dict[tuple, list[int]] = defaultdict(list)

    def visit(self, index: int, sample: Any) -> tuple[int, str]:
        label = _label_of(sample, self.key)
        if label is None or not 0 <= label < self.num_classes:
            self.bad_labels.append(index)
        digest = hashlib.sha256()
        leaves = _leaves(sample)
        self.structures[tuple(path for path, _ in leaves)].append(index)
        for path, value in leaves:
            tensor = _as_tensor(value)
            if tensor is None:
                digest.update(f"{path}\n".encode() + _opaque_bytes(value))
                continue
            self.signatures[path][(tuple(tensor.shape), tensor.dtype)].append(index)
            if (tensor.is_floating_point() or tensor.is_complex()) and not _all_finite(tensor):
                self.non_finite[path].append(index)
            if path != f"[{self.key!r}]":
                # Entry name, shape and dtype too: the same bytes read as another dtype or entry are other data.
                digest.update(f"{path} {tuple(tensor.shape)} {tensor.dtype}\n".encode())
                digest.update(_raw_bytes(tensor))
        return (label if label is not None else -1), digest.hexdigest()

    def problems(self) -> list[str]:
        problems = [
            f"{self.name}: {_ids_text(ids)} have NaN or inf values in sample{path}. "
            "Fix: clean them in your dataset (drop them, or impute e.g. with torch.nan_to_num) before training."
            for path, ids in self.non_finite.items()
        ]
        if self.bad_labels:
            problems.append(
                f"{self.name}: {_ids_text(self.bad_labels)} have a label that is not an integer in "
                f"[0, {self.num_classes}). Fix: map labels to 0..{self.num_classes - 1}, or set num_classes right."
            )
        problems += self._minority_problems("structure (entries and nesting)", self.structures)
        for path, groups in self.signatures.items():
            problems += self._minority_problems(f"shape or dtype of sample{path}", groups)
        return problems

    def _minority_problems(self, what: str, groups: Mapping[tuple, list[int]]) -> list[str]:
        if len(groups) < 2:
            return []
        common = max(groups, key=lambda g: len(groups[g]))
        odd = sorted(i for g, ids in groups.items() if g != common for i in ids)
        found = sorted({g for g in groups if g != common}, key=str)
        message = (
            f"{self.name}: {_ids_text(odd)} differ in {what} from the other samples ({common} expected, "
            f"found {', '.join(map(str, found[:3]))}). Fix: make every sample of the split the same shape and "
            "dtype, or pass validate=False if your collate_fn pads varying shapes."
        )
        return [message]


def scan_split(
    name: str,
    dataset: Dataset,
    num_classes: int,
    target_key: Key | None = None,
    check: bool = True,
    progress: bool = False,
) -> SplitScan:
    """Read every sample of ``dataset`` once and return its labels and input digests.

    With ``check=True`` a :class:`DataValidationError` lists every problem found, each with the
    ids of the samples concerned and how to fix it: NaN or inf values, labels outside
    ``[0, num_classes)``, and samples whose shape or dtype differs from the rest.

    Example:
        >>> import torch
        >>> from torch.utils.data import TensorDataset
        >>> scan = scan_split("train", TensorDataset(torch.rand(4, 2), torch.tensor([0, 1, 1, 0])), num_classes=2)
        >>> scan.labels.tolist(), len(scan.digests)
        ([0, 1, 1, 0], 4)
    """
    length = len(dataset)  # type: ignore[arg-type]
    if length == 0:
        raise DataValidationError(
            f"The {name} split is empty. Fix: check that your datamodule's setup() loads data for it "
            "(the data path, the split fractions, any filter applied before)."
        )
    key = resolve_key(dataset[0], target_key, "target")
    checker = _SplitChecker(name, num_classes, key)
    labels, digests = [], []
    # rich draws on a terminal only, and leaves no line behind (transient): a log gets none.
    for index in track(range(length), f"Checking {name} data", disable=not progress, transient=True):
        label, digest = checker.visit(index, dataset[index])
        labels.append(label)
        digests.append(digest)
    scan = SplitScan(name, torch.tensor(labels, dtype=torch.long), digests, checker.problems())
    if check and scan.problems:
        raise DataValidationError.of(scan.problems)
    return scan


def split_loader(datamodule: LightningDataModule, split: str) -> Any:
    """What the datamodule's ``{split}_dataloader`` returns; None if it has none. An empty train split is refused."""
    hook = f"{split}_dataloader"
    if not is_overridden(hook, datamodule, LightningDataModule):
        return None
    try:
        return getattr(datamodule, hook)()
    except ValueError as error:
        if "num_samples=0" not in str(error):  # torch's RandomSampler refusing an empty dataset
            raise
        raise DataValidationError(
            f"The {split} split is empty. Fix: check that your datamodule's setup() loads data for it."
        ) from error


def split_dataset(datamodule: LightningDataModule, split: str) -> Dataset | None:
    """The dataset of a split, or None when the datamodule has no such split or several loaders for it."""
    loader = split_loader(datamodule, split)
    # Several loaders for one split are left unchecked: which one a sample id refers to is ambiguous.
    return loader.dataset if isinstance(loader, DataLoader) else None


@dataclass
class DataSummary:
    """Counts per class, imbalance and train/test overlap, logged before training."""

    num_classes: int
    counts: dict[str, list[int]]
    duplicates: list[tuple[int, int]]
    poisoned: list[int] | None = None

    @property
    def imbalance_ratio(self) -> float:
        """Largest over smallest train class; infinite when a class has no training sample."""
        train = self.counts["train"]
        return max(train) / min(train) if min(train) else float("inf")

    def __str__(self) -> str:
        splits = list(self.counts)
        header = ["class", *splits] + (["poisoned"] if self.poisoned is not None else [])
        rows = [
            [c, *(self.counts[s][c] for s in splits)] + ([self.poisoned[c]] if self.poisoned is not None else [])
            for c in range(self.num_classes)
        ]
        lines = [format_table(header, rows)]
        lines.append(f"imbalance ratio (largest/smallest train class): {self.imbalance_ratio:.2f}")
        empty = [c for c, count in enumerate(self.counts["train"]) if count == 0]
        if empty:
            lines.append(f"classes with no training sample: {empty}")
        if "test" in self.counts:
            pairs = ", ".join(f"train {a} = test {b}" for a, b in self.duplicates[:_SHOWN_IDS])
            lines.append(
                f"exact duplicates between train and test: {len(self.duplicates)}" + (f" ({pairs})" if pairs else "")
            )
        return "\n".join(lines)


def _valid(labels: Tensor, num_classes: int) -> Tensor:
    return labels[(labels >= 0) & (labels < num_classes)]


def summarize(scans: Mapping[str, SplitScan], num_classes: int, poisoned_labels: Tensor | None = None) -> DataSummary:
    """Build the :class:`DataSummary` of scanned splits; duplicates compare input digests of train and test.

    ``poisoned_labels`` are the original classes of the samples a drill poisoned (or added).
    """
    counts = {
        name: torch.bincount(_valid(scan.labels, num_classes), minlength=num_classes).tolist()
        for name, scan in scans.items()
    }
    duplicates: list[tuple[int, int]] = []
    if "train" in scans and "test" in scans:
        test_ids: dict[str, list[int]] = defaultdict(list)
        for i, digest in enumerate(scans["test"].digests):
            test_ids[digest].append(i)
        duplicates = [(i, j) for i, digest in enumerate(scans["train"].digests) for j in test_ids.get(digest, [])]
    poisoned = None
    if poisoned_labels is not None:
        poisoned = torch.bincount(poisoned_labels, minlength=num_classes).tolist()
    return DataSummary(num_classes, counts, duplicates, poisoned)
