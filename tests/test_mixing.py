"""Mixup and CutMix in real Lightning training on the digits, with modules that know nothing of them."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import DumpWeightSum, Recorder, StructuredDigits, split_batch, trainer_kwargs
from lightning.pytorch import Callback, Trainer, seed_everything
from torch import nn

from robust_lightning import RobustDataModule
from robust_lightning.callbacks import AdversarialTraining, CutMix, Mixup, RobustLoss
from robust_lightning.losses import ELRLoss, GCELoss
from robust_lightning.losses.elr import ema_update


class Before(Callback):
    """Listed before the mixing callback: a copy of each clean batch. Listed after: the mixing it drew."""

    def __init__(self, mixing=None):
        self.mixing, self.clean, self.draws = mixing, [], []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if self.mixing is None:
            self.clean.append(split_batch(batch)[0].clone())
        else:
            self.draws.append(self.mixing._mix)


def fit(callbacks, datamodule=None, module=None, **kwargs):
    seed_everything(0)
    module = module or Recorder()
    settings = {"limit_val_batches": 0, "limit_train_batches": 4, **kwargs}
    trainer = Trainer(**trainer_kwargs(**settings), callbacks=callbacks)
    trainer.fit(module, datamodule=datamodule or StructuredDigits())
    return module


@pytest.mark.parametrize("structure", ["tuple", "list", "dict"])
@pytest.mark.parametrize("kind", [Mixup, CutMix])
def test_inputs_are_mixed_in_place_and_the_loss_with_them(structure, kind):
    mixing = kind(alpha=1.0)
    clean, drawn = Before(), Before(mixing)
    module = fit([clean, mixing, drawn], StructuredDigits(structure))
    for step, x, (lam, permutation) in zip(module.steps, clean.clean, drawn.draws):
        assert 0 < lam < 1
        if kind is Mixup:
            torch.testing.assert_close(step["x"], lam * x + (1 - lam) * x[permutation])
        else:
            from_other = (step["x"] != x).flatten(1)
            assert torch.equal(step["x"][from_other.view_as(x)], x[permutation][from_other.view_as(x)])
        expected = lam * nn.functional.cross_entropy(step["logits"], step["y"])
        expected += (1 - lam) * nn.functional.cross_entropy(step["logits"], step["y"][permutation])
        torch.testing.assert_close(step["loss"], expected)
    assert len(module.steps) == 4


def test_a_loss_without_soft_targets_gets_the_two_term_form():
    mixing = Mixup(alpha=0.4)
    drawn = Before(mixing)
    module = fit([RobustLoss(GCELoss()), mixing, drawn])
    for step, (lam, permutation) in zip(module.steps, drawn.draws):
        y = step["y"]
        expected = lam * GCELoss()(step["logits"], y) + (1 - lam) * GCELoss()(step["logits"], y[permutation])
        torch.testing.assert_close(step["loss"], expected)


class CleanLogits(Callback):
    """Listed before the mixing callback: the model's outputs on each unmixed batch, in eval mode."""

    def __init__(self):
        self.logits = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        pl_module.eval()
        with torch.no_grad():
            self.logits.append(pl_module(split_batch(batch)[0]))
        pl_module.train()


def test_elr_under_mixup_follows_the_unmixed_predictions_once_per_step_and_mixes_its_targets():
    elr = ELRLoss(num_classes=10, beta=0.7)
    clean, mixing = CleanLogits(), Mixup()
    drawn = Before(mixing)
    datamodule = RobustDataModule(StructuredDigits(shuffle=False))
    module = fit([RobustLoss(elr), clean, mixing, drawn], datamodule, limit_train_batches=1)
    targets = ema_update(torch.zeros(64, 10), clean.logits[0], beta=0.7)  # one update from the initial zeros
    torch.testing.assert_close(elr.ema_targets[:64], targets)
    step, (lam, permutation) = module.steps[0], drawn.draws[0]
    mixed_targets = lam * targets + (1 - lam) * targets[permutation]
    y, logits = step["y"], step["logits"]
    cross_entropy = lam * nn.functional.cross_entropy(logits, y) + (1 - lam) * nn.functional.cross_entropy(
        logits, y[permutation]
    )
    regularizer = (1 - (mixed_targets * logits.softmax(1).clamp(1e-4, 1 - 1e-4)).sum(1)).log().mean()
    torch.testing.assert_close(step["loss"], cross_entropy + 3.0 * regularizer)


def test_mixing_follows_the_attack_and_refuses_what_it_cannot_compose_with():
    at = AdversarialTraining("fgsm", eps=0.1)
    assert len(fit([at, Mixup()]).steps) == 4
    with pytest.raises(ValueError, match="List AdversarialTraining before Mixup"):
        fit([Mixup(), AdversarialTraining("fgsm", eps=0.1)])
    with pytest.raises(ValueError, match="cannot go with TRADES"):
        fit([AdversarialTraining("trades", eps=0.1), CutMix()])
    with pytest.raises(ValueError, match="would both mix the batch"):
        fit([Mixup(), CutMix()])
    with pytest.raises(ValueError, match="alpha .* must be a positive number"):
        Mixup(alpha=0)


def test_cutmix_refuses_feature_vectors():
    class Flat(StructuredDigits):
        def setup(self, stage):
            super().setup(stage)
            self.train_set.x = self.train_set.x.flatten(1)

    with pytest.raises(ValueError, match="Use Mixup for feature vectors"):
        fit([CutMix()], Flat())


@pytest.mark.slow
@pytest.mark.parametrize("kind", [Mixup, CutMix])
def test_two_process_ddp_keeps_the_ranks_in_step(tmp_path, kind):
    trainer = Trainer(
        **trainer_kwargs(devices=2, strategy="ddp_spawn", limit_val_batches=0, default_root_dir=tmp_path),
        callbacks=[kind(), DumpWeightSum(str(tmp_path))],
    )
    trainer.fit(Recorder(), datamodule=StructuredDigits())
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert ranks[0] == ranks[1]


def test_soft_targets_from_the_dataset_are_mixed_like_the_inputs():
    class SoftLabels(Callback):
        """Turns each batch's labels into one-hot probabilities before the mixing callback sees them."""

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            batch[1] = nn.functional.one_hot(batch[1], 10).float()

    class SoftRecorder(Recorder):
        def training_step(self, batch, batch_idx):
            x, y = batch
            logits = self(x)
            loss = self.criterion(logits, y)
            self.steps.append({"y": y.clone(), "logits": logits.detach(), "loss": loss.detach()})
            return loss

    mixing = Mixup()
    drawn = Before(mixing)
    module = fit([SoftLabels(), mixing, drawn], StructuredDigits("list"), module=SoftRecorder())
    for step, (lam, permutation) in zip(module.steps, drawn.draws):
        soft = lam * step["y"] + (1 - lam) * step["y"][permutation]
        torch.testing.assert_close(step["loss"], nn.functional.cross_entropy(step["logits"], soft))
