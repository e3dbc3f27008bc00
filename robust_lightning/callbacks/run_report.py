"""RunReport: write the run report (report.html, report.md and their figures) at the end of fit and test."""

from __future__ import annotations

from pathlib import Path

from lightning.pytorch import Callback, LightningModule, Trainer

from robust_lightning.report.run_report import write_report


class RunReport(Callback):
    """Write the run report at the end of fit and of each test run, on rank zero.

    The report (see :func:`~robust_lightning.report.run_report.write_report`) has a summary of the test results, per-class accuracy
    across epochs with the class alerts, the confusion matrix, and, when the run has them, robust
    accuracy per class, the filter's score histogram and its most suspicious samples, and the drift
    statistics: each from the callback that collected it, in this trainer.

    Args:
        dirpath: where to write; by default the trainer's log folder.
        title: the report's heading.

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
        (['confusion.png', 'per_class_accuracy.png'], True)
    """

    def __init__(self, dirpath: str | Path | None = None, title: str = "Run report") -> None:
        self.dirpath, self.title = dirpath, title

    def _write(self, trainer: Trainer, pl_module: LightningModule) -> None:
        folder = (
            self.dirpath if self.dirpath is not None else (trainer.log_dir or trainer.default_root_dir)
        )  # a collective
        if trainer.is_global_zero:
            write_report(trainer, pl_module, folder, self.title)

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._write(trainer, pl_module)

    def on_test_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._write(trainer, pl_module)
