"""CutMix: paste a box of one sample into another and mix their labels by area."""

from __future__ import annotations

from torch import Tensor

from robust_lightning.augment import cutmix
from robust_lightning.callbacks.batch_mixing import BatchMixing


class CutMix(BatchMixing):
    """CutMix (Yun et al., ICCV 2019) for an unmodified module: boxes pasted in place, the loss through ``self.criterion``.

    Each image gets a box of another image of the batch covering a ``1 - lam`` share of it
    (``lam ~ Beta(alpha, alpha)``, then the exact share after clipping at the edges), and the
    loss is mixed by that share (see :class:`~robust_lightning.callbacks.batch_mixing.BatchMixing`).
    Inputs must be image batches ``(N, [C,] H, W)``.

    Args:
        alpha: of the Beta distribution; the paper uses 1.
        attr: the module's loss attribute.
        input_key: where the inputs are in a batch.
        target_key: where the labels are in a batch.

    Example:
        >>> from lightning.pytorch import Trainer
        >>> from robust_lightning.data import DigitsDataModule
        >>> from robust_lightning.models import SmallCNN
        >>> trainer = Trainer(max_epochs=1, callbacks=[CutMix()], logger=False, enable_checkpointing=False,
        ...                   enable_progress_bar=False, enable_model_summary=False)
        >>> trainer.fit(SmallCNN(), datamodule=DigitsDataModule())
        >>> trainer.global_step
        21
    """

    def mix(self, x: Tensor, lam: float, permutation: Tensor) -> tuple[Tensor, float]:
        return cutmix(x, lam, permutation)
