"""RunReport: write the run report (report.html, report.md and their figures) at the end of fit and test."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer

from robust_lightning.report.run_report import write_report

# The curves drawn when the module or a callback logs them, besides the mean training loss.
CURVES = ("train/acc", "val/loss", "val/acc", "val/accuracy/macro")


class RunReport(Callback):
    """Write the run report at the end of fit and of each test run, on rank zero.

    The report (see :func:`~robust_lightning.report.run_report.write_report`) has a summary of the
    test results, loss and accuracy curves, per-class accuracy across epochs with the class alerts,
    the confusion matrix, and, when the run has them, robust accuracy per class, the filter's score
    histogram and its most suspicious samples, the drift statistics and the run's configuration:
    each from the callback that collected it, in this trainer. The curves are the mean of the
    losses ``training_step`` returned in each epoch, and ``val/loss``, ``val/acc``, ``train/acc``
    and ``val/accuracy/macro`` where they are logged; they are saved in checkpoints, so a resumed
    run's report covers the whole run.

    Args:
        dirpath: where to write; by default the trainer's log folder.
        title: the report's heading.
        config: the run's configuration as text (YAML), shown at the end of the report.

    Example:
        >>> import tempfile
        >>> from lightning.pytorch import Trainer
        >>> from robust_lightning.callbacks import PerClassMetrics
        >>> from robust_lightning.data import DigitsDataModule
        >>> from robust_lightning.models import SmallCNN
        >>> folder = Path(tempfile.mkdtemp())
        >>> trainer = Trainer(max_epochs=2, callbacks=[PerClassMetrics(10), RunReport(folder)], logger=False,
        ...                   enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
        >>> trainer.fit(SmallCNN(), datamodule=DigitsDataModule())
        >>> sorted(p.name for p in (folder / "report").iterdir()), (folder / "report.html").exists()
        (['confusion.png', 'per_class_accuracy.png', 'training_curves.png'], True)
    """

    def __init__(self, dirpath: str | Path | None = None, title: str = "Run report", config: str | None = None) -> None:
        self.dirpath, self.title, self.config = dirpath, title, config
        self.history: list[dict[str, float]] = []
        self._loss_sum, self._steps = torch.zeros(()), 0

    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._loss_sum, self._steps = torch.zeros((), device=pl_module.device), 0

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if isinstance(loss, torch.Tensor):
            self._loss_sum += loss.detach().float()  # no .item(): no device sync per step
            self._steps += 1

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # ModelCheckpoint saves here when validation runs, before on_train_epoch_end: record first.
        if trainer.state.fn == "fit" and not trainer.sanity_checking:
            self._record(trainer)

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # An epoch without validation; the history is the same on every rank, so all take this branch.
        if not self.history or self.history[-1]["epoch"] != trainer.current_epoch:
            self._record(trainer)

    def _record(self, trainer: Trainer) -> None:
        """This epoch's point of each curve, the same on every rank (a collective under DDP)."""
        mean = trainer.strategy.reduce(self._loss_sum / max(self._steps, 1), reduce_op="mean")
        record = {"epoch": trainer.current_epoch, "train/loss": float(mean)}
        logged = trainer.callback_metrics
        record |= {name: float(logged[name]) for name in CURVES if name in logged and logged[name].numel() == 1}
        if self.history and self.history[-1]["epoch"] == record["epoch"]:  # validated again within the epoch
            self.history[-1] = record
        else:
            self.history.append(record)

    def state_dict(self) -> dict[str, Any]:
        return {"history": self.history}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = list(state_dict["history"])

    def _write(self, trainer: Trainer, pl_module: LightningModule) -> None:
        folder = (
            self.dirpath if self.dirpath is not None else (trainer.log_dir or trainer.default_root_dir)
        )  # a collective
        if trainer.is_global_zero:
            write_report(trainer, pl_module, folder, self.title, config=self.config, history=self.history)

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._write(trainer, pl_module)

    def on_test_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._write(trainer, pl_module)
