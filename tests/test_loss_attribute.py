"""Every callback that changes the loss takes the module's loss attribute by name (attr=)."""

import pytest
import torch
from helpers import trainer_kwargs
from lightning.pytorch import Trainer

from robust_lightning import RobustDataModule
from robust_lightning.callbacks import AdversarialTraining, PoisonFilter, RobustLoss
from robust_lightning.data import DigitsDataModule
from robust_lightning.models import SmallCNN
from robust_lightning.poison import PairFlip


class OwnName(SmallCNN):
    """A user module whose loss lives under another name."""

    def __init__(self):
        super().__init__()
        self.loss_fn = self.criterion
        del self.criterion

    def training_step(self, batch, batch_idx):
        x, y = batch
        return self.loss_fn(self(x), y)

    def validation_step(self, batch, batch_idx):
        pass


CALLBACKS = {
    "AdversarialTraining(trades)": lambda **kw: AdversarialTraining("trades", eps=0.1, steps=2, **kw),
    "PoisonFilter(action=weight)": lambda **kw: PoisonFilter(start_epoch=1, action="weight", restart=None, **kw),
    "RobustLoss": lambda **kw: RobustLoss("gce", **kw),
}


@pytest.mark.parametrize("name", list(CALLBACKS))
def test_attr_names_the_loss_and_the_error_offers_it(name, tmp_path):
    def fit(callback):
        data = RobustDataModule(DigitsDataModule(), poison=PairFlip({4: 8}, rate=0.4))
        trainer = Trainer(**trainer_kwargs(max_epochs=2, limit_train_batches=4, default_root_dir=tmp_path))
        trainer.callbacks.append(callback)
        model = OwnName()
        trainer.fit(model, datamodule=data)
        return trainer, model

    with pytest.raises(AttributeError, match="pass attr='<that name>'"):
        fit(CALLBACKS[name]())
    trainer, model = fit(CALLBACKS[name](attr="loss_fn"))
    assert trainer.global_step == 8
    assert type(model.loss_fn) is torch.nn.CrossEntropyLoss, "the module's own loss is back after fit"
