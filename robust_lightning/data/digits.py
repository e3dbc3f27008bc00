"""The embedded default data: scikit-learn's bundled 8x8 handwritten digits."""

from __future__ import annotations

import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch.utils.data import TensorDataset

from robust_lightning.data.splits import SplitsDataModule


class DigitsDataModule(SplitsDataModule):
    """1,797 handwritten digits as ``(1, 8, 8)`` float tensors in [0, 1], in 10 classes.

    The test split is carved first (stratified, seeded), as in the project's reference figures;
    validation is then carved from what remains. Batches are ``(x, y)`` tuples. No download.

    Args:
        batch_size: samples per batch.
        test_fraction: fraction of all samples held out for testing.
        val_fraction: fraction of the remaining samples held out for validation.
        seed: seeds both splits.
        num_workers: DataLoader worker processes.

    Example:
        >>> dm = DigitsDataModule()
        >>> dm.setup("fit")
        >>> len(dm.train_set), len(dm.val_set), len(dm.test_set)
        (1293, 144, 360)
    """

    num_classes = 10

    def __init__(
        self,
        batch_size: int = 64,
        test_fraction: float = 0.2,
        val_fraction: float = 0.1,
        seed: int = 0,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        for name, fraction in (("test_fraction", test_fraction), ("val_fraction", val_fraction)):
            if not 0 < fraction < 1:
                raise ValueError(f"{name} must lie in (0, 1), got {fraction!r}.")
        if batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}.")
        self.save_hyperparameters()
        self.train_set = self.val_set = self.test_set = None

    def setup(self, stage: str) -> None:
        if self.train_set is not None:
            return
        digits = load_digits()
        x = torch.tensor(digits.images / 16.0, dtype=torch.float32).unsqueeze(1)
        y = torch.tensor(digits.target, dtype=torch.long)
        seed = self.hparams.seed
        rest, test = train_test_split(
            torch.arange(len(y)), test_size=self.hparams.test_fraction, random_state=seed, stratify=y
        )
        train, val = train_test_split(rest, test_size=self.hparams.val_fraction, random_state=seed, stratify=y[rest])
        self.train_set, self.val_set, self.test_set = (TensorDataset(x[i], y[i]) for i in (train, val, test))
