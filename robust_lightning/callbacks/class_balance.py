"""ClassBalance: weight the loss so that every class counts as much as the others."""

from __future__ import annotations

from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from torch import Tensor

from robust_lightning.callbacks.criterion_swap import CriterionSwap, Reweight
from robust_lightning.data.robust import RobustDataModule


def balancing_weights(labels: Tensor, num_classes: int) -> Tensor:
    """``n / (K * n_c)`` per class, over the classes present; 0 for a class with no sample.

    >>> balancing_weights(torch.tensor([0, 0, 0, 1]), 2).tolist()
    [0.6666666865348816, 2.0]
    """
    counts = torch.bincount(labels, minlength=num_classes).float()
    present = counts > 0
    weights = torch.zeros(num_classes)
    weights[present] = len(labels) / (int(present.sum()) * counts[present])
    return weights


class ClassBalance(Callback):
    """Weight each training sample's loss by the inverse frequency of its class (rebalancing by reweighting).

    Class weights ``n / (K * n_c)`` come from the training labels as trained (a drill's, injected
    samples included) over the samples not excluded, recomputed at each epoch start, so that a
    class swollen by injected near-duplicates, or shrunk by a filter, counts as much as the others.
    The weights go through the module's ``self.criterion`` (the criterion swap), so the module stays
    unchanged and the callback composes with RobustLoss, PoisonFilter and Mixup (a mixed sample
    weighs the mix of its two classes' weights). Needs RobustDataModule for the labels.

    Args:
        attr: the module's loss attribute.

    Example:
        >>> from lightning.pytorch import Trainer
        >>> from robust_lightning import RobustDataModule
        >>> from robust_lightning.data import DigitsDataModule
        >>> from robust_lightning.models import SmallCNN
        >>> from robust_lightning.poison import ClassInjection
        >>> balance = ClassBalance()
        >>> trainer = Trainer(max_epochs=1, callbacks=[balance], logger=False, enable_checkpointing=False,
        ...                   enable_progress_bar=False, enable_model_summary=False)
        >>> dm = RobustDataModule(DigitsDataModule(), poison=ClassInjection(target=0, fraction=0.3))
        >>> trainer.fit(SmallCNN(), datamodule=dm)
        >>> round(float(balance.class_weights[0]), 2), round(float(balance.class_weights[1]), 2)
        (0.33, 1.28)
    """

    def __init__(self, attr: str = "criterion") -> None:
        self.attr = attr
        self.class_weights: Tensor | None = None
        self._in_step = False
        self._stage: Reweight | None = None

    @property
    def state_key(self) -> str:
        return self._generate_state_key(attr=self.attr)

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage == "fit":
            self._data = RobustDataModule.from_trainer(trainer, by="ClassBalance")
            self._stage = Reweight(CriterionSwap.of(pl_module, self.attr, by="ClassBalance"), self._weights)

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._stage.swap.add(self._stage)

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage == "fit" and self._stage is not None:
            self._stage.swap.remove(self._stage)

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        self.teardown(trainer, pl_module, "fit")

    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        kept = ~self._data.excluded
        self.class_weights = balancing_weights(self._data.train_labels[kept], self._data.num_classes)

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        self._in_step = True

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._in_step = False

    def _weights(self, target: Tensor) -> Tensor | None:
        if not self._in_step:
            return None  # validation
        class_weights = self.class_weights.to(target.device)
        if target.is_floating_point():  # class probabilities (a mixing callback's): their mix of the weights
            return target @ class_weights.to(target.dtype)
        return class_weights[target]
