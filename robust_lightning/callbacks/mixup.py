"""Mixup: train on convex combinations of pairs of samples and of their labels."""

from __future__ import annotations

from torch import Tensor

from robust_lightning.augment import mixup
from robust_lightning.callbacks.batch_mixing import BatchMixing


class Mixup(BatchMixing):
    """Mixup (Zhang et al., ICLR 2018) for an unmodified module: inputs mixed in place, the loss through ``self.criterion``.

    Each batch becomes ``lam * x + (1 - lam) * x[perm]`` with ``lam ~ Beta(alpha, alpha)``, and the
    loss is mixed alike (see :class:`~robust_lightning.callbacks.batch_mixing.BatchMixing` for the
    rule, and the order with AdversarialTraining). Memorizing a wrong label gets harder when every
    input is a blend, which is why mixup resists label noise (the paper's section 3.3).

    Args:
        alpha: of the Beta distribution; the paper uses 1 on CIFAR-10 and up to 32 against label noise.
        attr: the module's loss attribute.
        input_key: where the inputs are in a batch.
        target_key: where the labels are in a batch.

    Example:
        >>> from lightning.pytorch import Trainer
        >>> from robust_lightning.data import DigitsDataModule
        >>> from robust_lightning.models import SmallCNN
        >>> trainer = Trainer(max_epochs=1, callbacks=[Mixup(alpha=1.0)], logger=False, enable_checkpointing=False,
        ...                   enable_progress_bar=False, enable_model_summary=False)
        >>> trainer.fit(SmallCNN(), datamodule=DigitsDataModule())
        >>> trainer.global_step
        21
    """

    def mix(self, x: Tensor, lam: float, permutation: Tensor) -> tuple[Tensor, float]:
        return mixup(x, lam, permutation), lam
