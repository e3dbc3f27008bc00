"""The callbacks under mixed precision (bf16 on the CPU) and on a compiled module: each trains."""

import pytest
import torch
from helpers import trainer_kwargs
from lightning.pytorch import Trainer, seed_everything

from robust_lightning import RobustDataModule
from robust_lightning.callbacks import AdversarialTraining, EMAWeights, PoisonFilter, PseudoLabels, RobustLoss
from robust_lightning.data import DigitsDataModule
from robust_lightning.losses import GCELoss
from robust_lightning.models import SmallCNN
from robust_lightning.poison import PairFlip

# Twelve short trainings, each variant of a path the fast tests train already: CI runs them.
pytestmark = pytest.mark.slow

CALLBACKS = {
    "PoisonFilter": lambda tmp: [PoisonFilter(start_epoch=1, every_n_epochs=1, dirpath=tmp)],
    "PoisonFilter+PseudoLabels": lambda tmp: [
        PoisonFilter(start_epoch=1, every_n_epochs=1, dirpath=tmp),
        PseudoLabels(threshold=0.5),
    ],
    "AdversarialTraining": lambda tmp: [AdversarialTraining("pgd", eps=0.1, steps=2)],
    "AdversarialTraining(trades)": lambda tmp: [AdversarialTraining("trades", eps=0.1, steps=2)],
    "RobustLoss": lambda tmp: [RobustLoss(GCELoss())],
    "EMAWeights": lambda tmp: [EMAWeights(decay=0.9)],
}


def fit(callbacks, model, **overrides):
    seed_everything(0)
    data = RobustDataModule(DigitsDataModule(), poison=PairFlip({4: 8, 8: 4}, rate=0.4))
    trainer = Trainer(**trainer_kwargs(max_epochs=3, limit_train_batches=6, callbacks=callbacks, **overrides))
    trainer.fit(model, datamodule=data)
    return trainer


def trained(trainer):
    return trainer.global_step > 0 and bool(torch.isfinite(trainer.callback_metrics.get("val_loss", torch.tensor(0.0))))


@pytest.mark.parametrize("name", list(CALLBACKS))
def test_each_callback_trains_under_bf16_mixed_precision(name, tmp_path):
    trainer = fit(CALLBACKS[name](tmp_path), SmallCNN(), precision="bf16-mixed")
    assert trained(trainer) and trainer.current_epoch >= 3
    filters = [c for c in trainer.callbacks if isinstance(c, PoisonFilter)]
    assert all(f.rounds and f.rounds[0]["flagged"] > 0 for f in filters), "the filter judged bf16 signals"


@pytest.mark.parametrize("name", list(CALLBACKS))
def test_each_callback_trains_a_compiled_module(name, tmp_path):
    # The eager backend traces with dynamo as any backend does, without a C++ compile in the test.
    trainer = fit(CALLBACKS[name](tmp_path), torch.compile(SmallCNN(), backend="eager"))
    assert trained(trainer) and trainer.current_epoch >= 3
    filters = [c for c in trainer.callbacks if isinstance(c, PoisonFilter)]
    assert all(f.rounds and f.rounds[0]["flagged"] > 0 for f in filters)
