"""A DataModule and a LightningModule written as in Lightning's documentation, with dict batches.

Neither knows robust-lightning; the wrapper and the callback must work with them unchanged.
"""

import pytest
import torch
import torch.nn.functional as F
from helpers import trainer_kwargs
from lightning.pytorch import LightningDataModule, LightningModule, Trainer
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import DataLoader, Dataset, random_split

from robust_lightning import RobustDataModule
from robust_lightning.callbacks import PerClassMetrics
from robust_lightning.poison import PairFlip


class DigitsDict(Dataset):
    def __init__(self, train: bool):
        digits = load_digits()
        images = torch.tensor(digits.images, dtype=torch.float32) / 16
        labels = torch.tensor(digits.target)
        cut = 1400
        self.images, self.labels = (images[:cut], labels[:cut]) if train else (images[cut:], labels[cut:])

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, idx):
        return {"image": self.images[idx].unsqueeze(0), "label": self.labels[idx]}


class DigitsDataModule(LightningDataModule):
    def __init__(self, batch_size: int = 32):
        super().__init__()
        self.batch_size = batch_size
        self.num_classes = 10

    def setup(self, stage: str):
        if stage == "fit":
            full = DigitsDict(train=True)
            self.digits_train, self.digits_val = random_split(
                full, [1260, 140], generator=torch.Generator().manual_seed(42)
            )
        if stage == "test":
            self.digits_test = DigitsDict(train=False)

    def train_dataloader(self):
        return DataLoader(self.digits_train, batch_size=self.batch_size, shuffle=True)

    def val_dataloader(self):
        return DataLoader(self.digits_val, batch_size=self.batch_size)

    def test_dataloader(self):
        return DataLoader(self.digits_test, batch_size=self.batch_size)


class LitClassifier(LightningModule):
    def __init__(self):
        super().__init__()
        self.l1 = nn.Linear(64, 128)
        self.l2 = nn.Linear(128, 10)

    def forward(self, x):
        return self.l2(torch.relu(self.l1(x.view(x.size(0), -1))))

    def training_step(self, batch, batch_idx):
        x, y = batch["image"], batch["label"]
        loss = F.cross_entropy(self(x), y)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch["image"], batch["label"]
        self.log("val_loss", F.cross_entropy(self(x), y))

    def test_step(self, batch, batch_idx):
        x, y = batch["image"], batch["label"]
        self.log("test_acc", (self(x).argmax(1) == y).float().mean())

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-2)


def test_a_documentation_style_project_trains_with_the_wrapper_a_drill_and_per_class_metrics():
    torch.manual_seed(0)
    drill = PairFlip({4: 8, 8: 4}, rate=0.45)
    datamodule = RobustDataModule(DigitsDataModule(), poison=drill)
    metrics = PerClassMetrics(num_classes=10)
    model = LitClassifier()
    trainer = Trainer(**trainer_kwargs(max_epochs=15, callbacks=[metrics]))
    trainer.fit(model, datamodule=datamodule)
    results = trainer.test(model, datamodule=datamodule, verbose=False)[0]

    assert datamodule.summary.counts["test"] == torch.bincount(DigitsDict(train=False).labels, minlength=10).tolist()
    assert sum(datamodule.summary.poisoned) == int(datamodule.poison_mask.sum()) > 0
    assert results["test_acc"] > 0.8
    recall = torch.tensor(metrics.last("test")["recall"])
    flipped, clean = recall[[4, 8]].mean(), recall[[0, 1, 2, 3, 5, 6, 7, 9]].mean()
    assert flipped < clean, "the flipped pair is learned worse than the clean classes"
    assert len([r for r in metrics.history if r["stage"] == "val"]) == 15


def test_the_documentation_style_module_without_forward_gets_a_clear_error():
    class NoForward(LitClassifier):
        forward = LightningModule.forward

        def training_step(self, batch, batch_idx):
            return self.l2(torch.relu(self.l1(batch["image"].flatten(1)))).sum()

        def validation_step(self, batch, batch_idx):
            pass

    trainer = Trainer(**trainer_kwargs(callbacks=[PerClassMetrics(num_classes=10)], limit_train_batches=1))
    with pytest.raises(NotImplementedError, match=r"Add a forward\(self, x\)"):
        trainer.fit(NoForward(), datamodule=RobustDataModule(DigitsDataModule()))
