"""Training end to end at 100k samples, with the recipes' filter and without: the part of benchmarks/scale.py that trains."""

from __future__ import annotations

import time

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from common import SCRATCH
from filtering import filter_group
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn
from torch.utils.data import TensorDataset

from robust_lightning import RobustDataModule
from robust_lightning.callbacks import PoisonFilter
from robust_lightning.data.splits import SplitsDataModule
from robust_lightning.detectors import detection_quality
from robust_lightning.models import SmallCNN
from robust_lightning.poison import PairFlip

TRAIN, VAL, TEST = 100_000, 5_000, 10_000


def warped(images: torch.Tensor, labels: torch.Tensor, count: int, seed: int, size: int) -> TensorDataset:
    """``count`` digits of ``size`` x ``size``: bundled 8x8 ones drawn at random, upsampled (at 28: to 24 and
    padded by 2), rotated, scaled, shifted and noised."""
    g = torch.Generator().manual_seed(seed)
    drawn = torch.randint(0, len(images), (count,), generator=g)
    big = images[drawn]
    if size > 8:
        inner = size * 6 // 7
        big = F.interpolate(big, size=inner, mode="bilinear", align_corners=False)
        big = F.pad(big, [(size - inner) // 2, size - inner - (size - inner) // 2] * 2)
    angle = (torch.rand(count, generator=g) - 0.5) * 0.5  # up to about 14 degrees either way
    scale = 0.9 + 0.2 * torch.rand(count, generator=g)
    shift = (torch.rand(count, 2, generator=g) - 0.5) * 0.2
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1)
    grid = F.affine_grid(theta, list(big.shape), align_corners=False)
    out = F.grid_sample(big, grid, align_corners=False) + 0.05 * torch.randn(big.shape, generator=g)
    return TensorDataset(out.clamp(0, 1), labels[drawn])


class WarpedDigits(SplitsDataModule):
    """``train`` training (100k by default), 5k validation and 10k test digits (28x28 by default), each split warped
    from its own bundled digits."""

    num_classes = 10

    def __init__(self, size: int = 28, train: int = TRAIN, batch_size: int = 256, num_workers: int = 0) -> None:
        super().__init__()
        self.save_hyperparameters()

    def setup(self, stage: str) -> None:
        digits = load_digits()
        x = torch.tensor(digits.images, dtype=torch.float32)[:, None] / 16
        y = torch.tensor(digits.target)
        rest, test = train_test_split(range(len(y)), test_size=0.2, random_state=0, stratify=y)
        train, val = train_test_split(rest, test_size=0.1, random_state=0, stratify=y[rest])
        size = self.hparams.size
        self.train_set = warped(x[train], y[train], self.hparams.train, seed=0, size=size)
        self.val_set = warped(x[val], y[val], VAL, seed=1, size=size)
        self.test_set = warped(x[test], y[test], TEST, seed=2, size=size)


class BatchNormCNN(SmallCNN):
    """SmallCNN's training with a deeper feature stack: three conv-BatchNorm blocks, pooled between."""

    def __init__(self) -> None:
        super().__init__()

        def block(cin: int, cout: int) -> list[nn.Module]:
            return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]

        self.features = nn.Sequential(
            *block(1, 32), nn.MaxPool2d(2), *block(32, 64), nn.MaxPool2d(2), *block(64, 128),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(128, 64), nn.ReLU(),
        )  # fmt: skip


class NoValidationCNN(SmallCNN):
    """SmallCNN as many users' modules are: with no validation_step."""

    validation_step = None


MODELS = {"SmallCNN": SmallCNN, "BatchNormCNN": BatchNormCNN, "NoValidationCNN": NoValidationCNN}


def run(model_name: str, option: str, epochs: int, size: int, train: int = TRAIN) -> dict:
    pl.seed_everything(0, verbose=False)
    data = RobustDataModule(
        WarpedDigits(size, train), poison=PairFlip({4: 8, 8: 4, 6: 9, 9: 6}, rate=0.4), validate=False
    )
    callbacks = filter_group(option) if option != "none" else []
    trainer = pl.Trainer(
        max_epochs=epochs, accelerator="auto", devices=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, callbacks=callbacks, default_root_dir=SCRATCH,
    )  # fmt: skip
    model = MODELS[model_name]()
    start = time.perf_counter()
    trainer.fit(model, datamodule=data)
    seconds = time.perf_counter() - start
    accuracy = trainer.test(model, datamodule=data, verbose=False)[0]["test/acc"]
    row = {"seconds": seconds, "acc": accuracy}
    filters = [c for c in callbacks if isinstance(c, PoisonFilter)]
    if filters:
        row.update(detection_quality(filters[0].flags, data.poison_mask))
    return row


def run_end_to_end(models: list[str], epochs: int, size: int) -> str:
    lines = [
        "| model | filter=none | filter=default | wall time, default / none | F1 of the flags |",
        "|---|---|---|---|---|",
    ]
    for name in models:
        none, default = run(name, "none", epochs, size), run(name, "default", epochs, size)
        print(name, none, default, flush=True)
        lines.append(
            f"| {name} | {none['acc']:.1%}, {none['seconds']:.0f} s | {default['acc']:.1%}, {default['seconds']:.0f} s "
            f"| {default['seconds'] / none['seconds']:.2f}x | {default['f1']:.2f} |"
        )
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"{torch.get_num_threads()} CPU threads"
    lines.append(
        f"\n100,000 training samples of {size}x{size}, pair flip 40%, {epochs} epochs, batch 256, on {device}. "
        f"Command: `python benchmarks/scale.py --end-to-end --size {size} --epochs {epochs}`."
    )
    return "\n".join(lines)
