"""The biased-injection drill, near-duplicate detection and class rebalancing, on the digits."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import DumpWeightSum, Recorder, StructuredDigits, split_batch, trainer_kwargs
from lightning.pytorch import Trainer, seed_everything
from torch import nn

from robust_lightning import RobustDataModule
from robust_lightning.callbacks import ClassBalance, Mixup, PoisonFilter
from robust_lightning.data import DigitsDataModule
from robust_lightning.detectors import NearDuplicates, detection_quality, near_duplicates
from robust_lightning.models import SmallCNN
from robust_lightning.poison import ClassInjection


def injected(fraction=0.3, **kwargs):
    datamodule = RobustDataModule(DigitsDataModule(), poison=ClassInjection(0, fraction, **kwargs))
    datamodule.setup("fit")
    return datamodule


def test_the_drill_appends_near_copies_of_one_class_with_a_ground_truth_mask():
    datamodule = injected()
    n = 1293
    assert datamodule.num_train == n + 388 and datamodule.poison_mask[n:].all() and not datamodule.poison_mask[:n].any()
    assert datamodule.summary.poisoned == [388] + [0] * 9
    labels = datamodule.train_labels
    assert (labels[n:] == 0).all()
    copies = torch.stack([datamodule.training_sample(i)[0] for i in range(n, n + 20)])
    originals = torch.stack([datamodule.training_sample(i)[0] for i in range(n)])
    nearest = torch.cdist(copies.flatten(1), originals.flatten(1)).amin(1)
    assert (nearest > 0).all() and (nearest < 0.4).all(), "perturbed, yet near an original"
    assert copies.min() >= 0 and copies.max() <= 1
    relabelled = injected(relabel=6)
    assert (relabelled.train_labels[n:] == 6).all()


def test_copies_keep_the_inputs_dtype_and_the_whole_class_range():
    labels = torch.tensor([0, 0, 1, 1])
    images = torch.tensor([[0, 40], [200, 90], [10, 250], [0, 255]], dtype=torch.uint8)
    beyond_own_range = False
    for seed in range(5):
        added = ClassInjection(0, 0.25, noise=300.0, seed=seed).inject(lambda ids: images[ids], labels, num_classes=2)
        assert added.inputs.dtype == torch.uint8
        assert added.inputs.min() >= 0 and added.inputs.max() <= 200, "within class 0's range"
        source = images[added.sources]
        beyond_own_range |= bool((added.inputs < source.min()).any() or (added.inputs > source.max()).any())
    assert beyond_own_range, "clipped to the whole class's range, not to the copied sample's"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"fraction": 0}, "fraction"),
        ({"fraction": 0.3, "relabel": 0}, "relabel must name another class"),
        ({"fraction": 0.3, "noise": -1}, "noise must be"),
    ],
)
def test_bad_drill_arguments_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ClassInjection(0, **kwargs)


def test_near_duplicate_detection_on_the_inputs_finds_the_copies_and_spares_the_rest():
    for seed in range(3):
        datamodule = RobustDataModule(
            DigitsDataModule(seed=seed), poison=ClassInjection(0, 0.3, seed=seed), validate=False
        )
        datamodule.setup("fit")
        inputs = torch.stack([datamodule.training_sample(i)[0] for i in range(datamodule.num_train)])
        flags = near_duplicates(inputs).flags
        quality = detection_quality(flags, datamodule.poison_mask)
        assert quality["recall"] >= 0.95, quality
        assert float(flags[~datamodule.poison_mask].float().mean()) < 0.02


def test_the_filter_excludes_near_duplicates_while_training():
    seed_everything(0)
    datamodule = injected()
    flt = PoisonFilter(
        screen=[NearDuplicates()], detectors=[NearDuplicates()], start_epoch=1, every_n_epochs=1, restart=None
    )
    Trainer(**trainer_kwargs(max_epochs=3, callbacks=[flt])).fit(SmallCNN(), datamodule=datamodule)
    quality = detection_quality(flt.flags, datamodule.poison_mask)
    assert quality["recall"] >= 0.85 and quality["precision"] >= 0.95, quality
    assert torch.equal(datamodule.excluded, flt.flags)


class LossCheck(ClassBalance):
    """ClassBalance that checks, at every step, the module's loss against the weighted CE computed here."""

    checked = 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        super().on_train_batch_start(trainer, pl_module, batch, batch_idx)
        x, y = split_batch(batch)
        logits = pl_module(x)
        weights = self.class_weights[y]
        expected = (nn.functional.cross_entropy(logits, y, reduction="none") * weights).sum() / weights.sum()
        torch.testing.assert_close(pl_module.criterion(logits, y), expected)
        self.checked += 1


@pytest.mark.parametrize("structure", ["tuple", "list", "dict"])
def test_class_balance_weights_each_class_by_its_inverse_frequency(structure):
    datamodule = RobustDataModule(StructuredDigits(structure), poison=ClassInjection(0, 0.3))
    check = LossCheck()
    settings = {"max_epochs": 1, "limit_train_batches": 3, "limit_val_batches": 0, "callbacks": [check]}
    Trainer(**trainer_kwargs(**settings)).fit(Recorder(), datamodule=datamodule)
    counts = torch.bincount(datamodule.train_labels, minlength=10).float()
    torch.testing.assert_close(check.class_weights, len(datamodule.train_labels) / (10 * counts))
    assert check.checked == 3


def test_class_balance_composes_with_mixup_and_needs_sample_ids():
    Trainer(**trainer_kwargs(max_epochs=1, limit_train_batches=3, callbacks=[ClassBalance(), Mixup()])).fit(
        SmallCNN(), datamodule=injected()
    )
    with pytest.raises(TypeError, match="ClassBalance needs sample ids"):
        Trainer(**trainer_kwargs(callbacks=[ClassBalance()])).fit(SmallCNN(), datamodule=DigitsDataModule())


@pytest.mark.slow
def test_class_balance_keeps_two_ddp_ranks_in_step(tmp_path):
    trainer = Trainer(
        **trainer_kwargs(devices=2, strategy="ddp_spawn", limit_val_batches=0, default_root_dir=tmp_path),
        callbacks=[ClassBalance(), DumpWeightSum(str(tmp_path))],
    )
    trainer.fit(Recorder(), datamodule=RobustDataModule(StructuredDigits(), poison=ClassInjection(0, 0.3)))
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert ranks[0] == ranks[1]


def test_exact_copies_are_flagged_even_when_most_samples_have_one():
    rows = torch.randn(10, 4, generator=torch.Generator().manual_seed(0))
    flags = near_duplicates(torch.cat([rows, rows, rows[:3]])).flags
    assert flags.tolist() == [False] * 10 + [True] * 13
