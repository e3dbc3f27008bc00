"""MNIST and CIFAR-10 through torchvision, for users with internet access: downloaded on first use."""

from __future__ import annotations

import torch
from torch.utils.data import Dataset, random_split
from torchvision import datasets, transforms

from robust_lightning.attacks import InputBounds
from robust_lightning.data.splits import SplitsDataModule

# Per-channel mean and std of each training set, the values the literature normalizes with.
NORMALIZATION = {
    "MNIST": ((0.1307,), (0.3081,)),
    "CIFAR10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
}


class VisionDataModule(SplitsDataModule):
    """MNIST or CIFAR-10 from torchvision, as normalized ``(C, H, W)`` tensors, in 10 classes.

    ``prepare_data`` downloads into ``root`` (once, on one process); validation is a seeded
    ``val_fraction`` of the training set. :attr:`bounds` is the range of the normalized pixels,
    for :class:`~robust_lightning.callbacks.AdversarialTraining`.

    Example:
        >>> dm = VisionDataModule("CIFAR10", download=False)
        >>> dm.bounds.low.flatten().tolist()[0] < 0 < dm.bounds.high.flatten().tolist()[0]
        True
    """

    num_classes = 10

    def __init__(
        self,
        name: str = "MNIST",
        root: str = "data",
        batch_size: int = 128,
        val_fraction: float = 0.1,
        seed: int = 0,
        num_workers: int = 2,
        download: bool = True,
    ) -> None:
        super().__init__()
        if name not in NORMALIZATION:
            raise ValueError(f"Unknown dataset {name!r}: choose one of {sorted(NORMALIZATION)}.")
        if not 0 < val_fraction < 1:
            raise ValueError(f"val_fraction must lie in (0, 1), got {val_fraction!r}.")
        self.save_hyperparameters()
        self.train_set: Dataset | None = None
        self.val_set: Dataset | None = None
        self.test_set: Dataset | None = None

    @property
    def bounds(self) -> InputBounds:
        mean, std = NORMALIZATION[self.hparams.name]
        return InputBounds.normalized(mean, std)

    def _dataset(self, train: bool, download: bool = False) -> Dataset:
        mean, std = NORMALIZATION[self.hparams.name]
        transform = transforms.Compose([transforms.ToTensor(), transforms.Normalize(mean, std)])
        kind = getattr(datasets, self.hparams.name)
        return kind(self.hparams.root, train=train, download=download, transform=transform)

    def prepare_data(self) -> None:
        for train in (True, False):
            self._dataset(train, download=self.hparams.download)

    def setup(self, stage: str) -> None:
        if self.train_set is not None:
            return
        full = self._dataset(train=True)
        generator = torch.Generator().manual_seed(self.hparams.seed)
        self.train_set, self.val_set = random_split(
            full, [1 - self.hparams.val_fraction, self.hparams.val_fraction], generator=generator
        )
        self.test_set = self._dataset(train=False)
