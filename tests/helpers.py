"""DataModules and modules written the way users write them, without robust-lightning in mind."""

from __future__ import annotations

import base64
import json
import os
import signal
from html.parser import HTMLParser
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from lightning.pytorch import Callback, LightningDataModule, LightningModule
from omegaconf import open_dict
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, Dataset

from robust_lightning import RobustDataModule
from robust_lightning.cli import run
from robust_lightning.config import CONFIG_DIR, register_recipes
from robust_lightning.data import DigitsDataModule


class ListDataset(Dataset):
    """Samples given as a list, whatever their form."""

    def __init__(self, samples):
        self.samples = samples

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, i):
        return self.samples[i]


class SampleDataset(Dataset):
    """Digits as tuple, list or dict samples."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, structure: str = "tuple"):
        self.x, self.y, self.structure = x, y, structure

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int):
        if self.structure == "dict":
            return {"image": self.x[i], "label": self.y[i]}
        if self.structure == "list":
            return [self.x[i], self.y[i]]
        return self.x[i], self.y[i]


class StructuredDigits(LightningDataModule):
    """A user datamodule over the digits whose samples are tuples, lists or dicts."""

    num_classes = 10

    def __init__(self, structure="tuple", shuffle=True, batch_size=64, train_size=None, val_size=None):
        super().__init__()
        self.structure, self.shuffle, self.batch_size = structure, shuffle, batch_size
        self.sizes = {"train": train_size, "val": val_size}

    def setup(self, stage: str) -> None:
        digits = DigitsDataModule()
        digits.setup(stage)
        splits = {}
        for name in ("train", "val", "test"):
            tensors = getattr(digits, f"{name}_set").tensors
            if self.sizes.get(name):
                tensors = [t[: self.sizes[name]] for t in tensors]
            splits[name] = SampleDataset(*tensors, structure=self.structure)
        self.train_set, self.val_set, self.test_set = splits["train"], splits["val"], splits["test"]

    def train_dataloader(self):
        return DataLoader(self.train_set, batch_size=self.batch_size, shuffle=self.shuffle)

    def val_dataloader(self):
        return DataLoader(self.val_set, batch_size=self.batch_size)

    def test_dataloader(self):
        return DataLoader(self.test_set, batch_size=self.batch_size)


def split_batch(batch):
    x, y = (batch["image"], batch["label"]) if isinstance(batch, dict) else (batch[0], batch[1])
    if isinstance(y, list):  # labels given as [3] collate to a list of one tensor
        (y,) = y
    return x, y.reshape(-1)


class RecordingClassifier(LightningModule):
    """A small classifier that records every training batch it receives, with the ids beside it."""

    def __init__(self, lr: float = 1e-2, num_classes: int = 10):
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, num_classes))
        self.criterion = nn.CrossEntropyLoss()
        self.lr = lr
        self.seen: list[tuple[int, object, torch.Tensor]] = []

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        ids = RobustDataModule.from_trainer(self.trainer).batch_ids
        self.seen.append((self.current_epoch, batch, ids.clone()))
        x, y = split_batch(batch)
        return self.criterion(self(x), y)

    def validation_step(self, batch, batch_idx):
        x, y = split_batch(batch)
        self.log("val_loss", self.criterion(self(x), y))

    def test_step(self, batch, batch_idx):
        x, y = split_batch(batch)
        self.log("test_acc", (self(x).argmax(1) == y).float().mean())

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr)

    def ids_by_epoch(self) -> dict[int, list[int]]:
        epochs: dict[int, list[int]] = {}
        for epoch, _, ids in self.seen:
            epochs.setdefault(epoch, []).extend(ids.tolist())
        return epochs


class Recorder(LightningModule):
    """A user's classifier that records each step's inputs, labels and loss."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
        self.criterion = nn.CrossEntropyLoss()
        self.steps = []

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = split_batch(batch)
        logits = self(x)
        loss = self.criterion(logits, y)
        self.steps.append({"x": x.detach().clone(), "y": y.clone(), "logits": logits.detach(), "loss": loss.detach()})
        return loss

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-2)


class DumpWeightSum(Callback):
    """Each rank's sum of the weights at the end of training, for DDP tests."""

    def __init__(self, folder):
        self.folder = folder

    def on_train_end(self, trainer, pl_module):
        total = float(sum(p.double().sum() for p in pl_module.parameters()))
        Path(self.folder, f"rank{trainer.global_rank}.json").write_text(json.dumps({"weights": total}))


class DumpHistory(Callback):
    """Writes each rank's PerClassMetrics history at the end of fit, for DDP tests."""

    def __init__(self, folder: str):
        self.folder = folder

    def on_fit_end(self, trainer, pl_module):
        from robust_lightning.callbacks import PerClassMetrics

        metrics = next(c for c in trainer.callbacks if isinstance(c, PerClassMetrics))
        Path(self.folder, f"history{trainer.global_rank}.json").write_text(json.dumps(metrics.history))


class DumpIdsPerEpoch(Callback):
    """Writes, per rank, the training ids seen in each epoch and the exclusion mask, for DDP tests."""

    def __init__(self, folder: str, exclude_after_epoch: dict[int, list[int]] | None = None):
        self.folder = folder
        self.exclude_after_epoch = exclude_after_epoch or {}
        self.ids: dict[int, list[int]] = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        ids = RobustDataModule.from_trainer(trainer).batch_ids
        self.ids.setdefault(trainer.current_epoch, []).extend(ids.tolist())

    def on_train_epoch_end(self, trainer, pl_module):
        dm = RobustDataModule.from_trainer(trainer)
        if trainer.current_epoch in self.exclude_after_epoch:
            dm.exclude(self.exclude_after_epoch[trainer.current_epoch])
        record = {"ids": self.ids, "excluded": dm.excluded_ids.tolist()}
        Path(self.folder, f"rank{trainer.global_rank}.json").write_text(json.dumps(record))


class KillAtEpoch(Callback):
    """Kills its own process with SIGKILL as epoch ``epoch`` starts: nothing gets to save or clean up."""

    def __init__(self, epoch: int):
        self.epoch = epoch

    def on_train_epoch_start(self, trainer, pl_module):
        if trainer.current_epoch == self.epoch:
            os.kill(os.getpid(), signal.SIGKILL)


def trainer_kwargs(**overrides):
    """Settings shared by the tests' Trainers: CPU, no files, no progress bars."""
    kwargs = {
        "accelerator": "cpu",
        "devices": 1,
        "max_epochs": 1,
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
    }
    kwargs.update(overrides)
    return kwargs


class ReportPage(HTMLParser):
    """report.html as a browser reads it: its section headings, and its images by the file each carries."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.headings: list[str] = []
        self.images: dict[str, str] = {}
        self.links: list[str] = []  # every href and src, in page order
        self._heading: list[str] | None = None
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.links += [value for name, value in attrs.items() if name in ("href", "src")]
        if tag == "img":
            self.images[attrs["data-file"]] = attrs["src"]
        if tag == "h2":
            self._heading = []

    def handle_endtag(self, tag):
        if tag == "h2" and self._heading is not None:
            self.headings.append("".join(self._heading).strip())
            self._heading = None

    def handle_data(self, data):
        if self._heading is not None:
            self._heading.append(data)


def check_report(folder):
    """The report's figures decode, and each is in the HTML (inline, byte for byte) and the Markdown."""
    figures = sorted((folder / "report").glob("*.png"))
    page, markdown = ReportPage((folder / "report.html").read_text()), (folder / "report.md").read_text()
    for figure in figures:
        with Image.open(figure) as image:
            image.verify()
            assert image.format == "PNG"
        source = page.images[f"report/{figure.name}"]
        assert source.startswith("data:image/png;base64,"), "self-contained"
        assert base64.b64decode(source.removeprefix("data:image/png;base64,")) == figure.read_bytes(), figure.name
        assert f"](report/{figure.name})" in markdown
    assert set(page.images) == {f"report/{figure.name}" for figure in figures}
    return {figure.name for figure in figures}


def compose_and_run(overrides: list[str], run_dir: Path) -> dict:
    """The command's config and run in this process: each mistake checked without starting Python again."""
    register_recipes()
    with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
        cfg = compose("config", overrides=overrides, return_hydra_config=True)
        HydraConfig.instance().set_config(cfg)
        with open_dict(cfg):
            del cfg.hydra
        return run(cfg, run_dir)
