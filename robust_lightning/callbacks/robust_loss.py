"""Train an unmodified LightningModule with a label-noise-robust loss in place of its own."""

from __future__ import annotations

import copy
import difflib
from typing import Any

from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_warn
from torch import nn

from robust_lightning.callbacks.criterion_swap import CriterionSwap
from robust_lightning.data import RobustDataModule
from robust_lightning.losses import LOSSES, PerSampleLoss


def build_loss(loss: str | nn.Module) -> nn.Module:
    """A loss module, or the registered loss of that name built with its defaults."""
    if isinstance(loss, nn.Module):
        if not hasattr(loss, "reduction"):
            raise TypeError(
                f"RobustLoss needs a loss with a `reduction` attribute, like torch's; got {type(loss).__name__}."
            )
        return loss
    if loss not in LOSSES:
        close = difflib.get_close_matches(str(loss), LOSSES, 1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"Unknown loss {loss!r}.{hint} Known: {sorted(LOSSES)}, or pass an nn.Module.")
    try:
        return LOSSES[loss]()
    except TypeError as error:
        name = LOSSES[loss].__name__
        raise TypeError(f"{name} has required arguments ({error}): pass RobustLoss({name}(...)) instead.") from None


class RobustLoss(Callback):
    """Compute the module's loss with ``loss`` for the run: ``module.<attr>`` is swapped, and restored after fit.

    The module's code stays as it is: its ``training_step`` calls ``self.criterion(logits, y)``
    and gets the robust loss, reduced as its own loss would reduce (its ``reduction``). Validation
    and test use it too while fitting; after fit, and when fit fails, the module's own loss is back.
    Losses with per-sample state (:class:`~robust_lightning.losses.ELRLoss`, an estimating
    :class:`~robust_lightning.losses.ForwardCorrectionLoss`) take sample ids from
    :class:`~robust_lightning.RobustDataModule`; their state is saved in this callback's checkpoint
    entry, not in the module's ``state_dict``, which stays loadable by the module alone. When a
    :class:`PoisonFilter` restarts the model, that state starts afresh with it.
    It composes with other callbacks that change the loss, such as ``PoisonFilter(action="weight")``.

    Args:
        loss: an ``nn.Module`` loss, or a name from :data:`robust_lightning.losses.LOSSES`.
        attr: the module's loss attribute.

    Example:
        >>> from lightning.pytorch import Trainer
        >>> from robust_lightning import RobustDataModule
        >>> from robust_lightning.data import DigitsDataModule
        >>> from robust_lightning.losses import GCELoss
        >>> from robust_lightning.models import SmallCNN
        >>> model = SmallCNN()
        >>> trainer = Trainer(max_epochs=1, callbacks=[RobustLoss(GCELoss(q=0.7))], logger=False,
        ...                   enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
        >>> trainer.fit(model, datamodule=RobustDataModule(DigitsDataModule(), validate=False))
        >>> type(model.criterion).__name__, "forward" in vars(model.criterion)  # the module's own loss is back
        ('CrossEntropyLoss', False)
    """

    restarts_with_model = True  # a PoisonFilter restart starts the loss's per-sample state afresh too

    def __init__(self, loss: str | nn.Module, attr: str = "criterion") -> None:
        self.loss = build_loss(loss)
        if not isinstance(attr, str) or not attr.isidentifier():
            raise ValueError(f"attr must be the name of the module's loss attribute, got {attr!r}.")
        self.attr = attr
        self._swap: CriterionSwap | None = None
        self._fresh = copy.deepcopy(self.loss.state_dict())  # each fit starts from it, unless resumed

    @property
    def state_key(self) -> str:
        return self._generate_state_key(loss=type(self.loss).__name__, attr=self.attr)

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        self._swap = CriterionSwap.of(pl_module, self.attr, by=f"RobustLoss({type(self.loss).__name__})")
        self.loss.load_state_dict(self._fresh)  # a checkpoint's state, if any, is loaded after setup
        if isinstance(self.loss, PerSampleLoss) and self.loss.needs_ids:
            self.loss.bind(
                RobustDataModule.from_trainer(trainer, by=f"{type(self.loss).__name__}, which keeps state per sample,")
            )
        warmup = getattr(self.loss, "warmup_epochs", None) if getattr(self.loss, "needs_ids", False) else None
        if warmup is not None and trainer.max_epochs is not None and 0 <= trainer.max_epochs <= warmup:
            rank_zero_warn(
                f"{type(self.loss).__name__} warms up for {warmup} epochs but the run has {trainer.max_epochs}: it "
                "stays plain cross-entropy throughout. Train longer or lower warmup_epochs."
            )
        self._warn_about_dropped_settings()

    def _warn_about_dropped_settings(self) -> None:
        name, own = type(self.loss).__name__, self._swap.loss
        if getattr(own, "weight", None) is not None and getattr(self.loss, "weight", None) is None:
            rank_zero_warn(
                f"The module's {self.attr} has class weights, which {name} does not apply. "
                f"Pass them to it: {name}(..., weight=...)."
            )
        if getattr(own, "label_smoothing", 0.0) > 0:
            rank_zero_warn(f"The module's {self.attr} smooths labels; {name} replaces it and does not.")

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.loss.to(pl_module.device)  # after the strategy moved the module, and after a restored state
        self._swap.replace(self.loss, by=f"RobustLoss({type(self.loss).__name__})")

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage == "fit" and self._swap is not None:
            self._swap.remove(self.loss)

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        self.teardown(trainer, pl_module, "fit")

    def state_dict(self) -> dict[str, Any]:
        return {"loss": self.loss.state_dict()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.loss.load_state_dict(state_dict["loss"])
