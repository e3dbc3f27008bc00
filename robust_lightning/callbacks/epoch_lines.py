"""A progress display for logs: one line per training epoch."""

from __future__ import annotations

import time
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import ProgressBar


class EpochLines(ProgressBar):
    """One line per training epoch, with the progress-bar metrics and the epoch's wall time.

    Lightning's bars redraw themselves per batch, which a log file, ``nohup`` or a CI log keeps as
    thousands of partial lines. The command line uses this display when its output is not a
    terminal, and Lightning's Rich bar when it is. Only the global-zero rank prints under DDP.

    Example:
        >>> from lightning.pytorch import Trainer
        >>> trainer = Trainer(callbacks=[EpochLines()], max_epochs=1, logger=False)
        >>> type(trainer.progress_bar_callback).__name__
        'EpochLines'
    """

    def __init__(self) -> None:
        super().__init__()
        self._enabled = True
        self._started = 0.0

    def disable(self) -> None:
        self._enabled = False

    def enable(self) -> None:
        self._enabled = True

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._started = time.perf_counter()

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not (self._enabled and trainer.is_global_zero):
            return
        metrics = {name: value for name, value in self.get_metrics(trainer, pl_module).items() if name != "v_num"}
        shown = ", ".join(f"{name} {_number(value)}" for name, value in sorted(metrics.items()))
        seconds = time.perf_counter() - self._started
        print(f"Epoch {trainer.current_epoch + 1}/{trainer.max_epochs}: {shown} ({seconds:.1f} s)", flush=True)


def _number(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)
