"""The loaders of a datamodule whose ``setup`` fills ``train_set``, ``val_set`` and ``test_set``."""

from __future__ import annotations

from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader, Dataset


class SplitsDataModule(LightningDataModule):
    """Train (shuffled), validation and test loaders over the three splits, with ``batch_size`` and
    ``num_workers`` from the subclass's saved hyperparameters."""

    def _loader(self, dataset: Dataset, shuffle: bool = False) -> DataLoader:
        workers = self.hparams.num_workers
        return DataLoader(
            dataset, self.hparams.batch_size, shuffle=shuffle, num_workers=workers, persistent_workers=workers > 0
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_set)
