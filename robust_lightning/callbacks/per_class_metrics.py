"""PerClassMetrics: per-class accuracy, precision, recall, F1 and the confusion matrix."""

from __future__ import annotations

import numbers
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch
from lightning.fabric.utilities.distributed import DistributedSamplerWrapper
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor
from torch.utils.data import DistributedSampler
from torchmetrics import MetricCollection
from torchmetrics.classification import (
    MulticlassAccuracy,
    MulticlassConfusionMatrix,
    MulticlassF1Score,
    MulticlassPrecision,
    MulticlassRecall,
)

from robust_lightning.data.fields import Key, get_field, resolve_key
from robust_lightning.data.loader import as_loader_list

METRICS = ("accuracy", "precision", "recall", "f1")


class ClassAlert(UserWarning):
    """A class's validation metrics fell, or its share of predictions strayed from its share of labels."""


_STAGES = ("val", "test")

# The values are synced by torchmetrics before they are logged, so logging them unsynced is right
# (and, unlike a second sync, works with NCCL whatever device they are on).
warnings.filterwarnings(
    "ignore", message=r"It is recommended to use `self.log\('(val|test)/(accuracy|precision|recall|f1)/"
)


def _present(confusion: Tensor) -> Tensor:
    """Classes that occur as a label or a prediction: the ones a macro average counts, as in torchmetrics."""
    return (confusion.sum(0) + confusion.sum(1)) > 0


def _not_padding(sampler: Any, start: int, count: int) -> Tensor | None:
    """Which of a rank's samples ``start .. start+count-1`` are real rather than DDP padding.

    DistributedSampler deals position ``rank + k * num_replicas`` of its index list to the rank's k-th
    sample, and pads the list's end with repeats: those positions lie past the dataset's length.
    """
    if type(sampler) not in (DistributedSampler, DistributedSamplerWrapper):
        return None
    positions = sampler.rank + sampler.num_replicas * torch.arange(start, start + count)
    return positions < len(sampler.dataset)


def _collection(num_classes: int) -> MetricCollection:
    per_class = {"num_classes": num_classes, "average": None}
    return MetricCollection(
        {
            "accuracy": MulticlassAccuracy(**per_class),
            "precision": MulticlassPrecision(**per_class, zero_division=0),
            "recall": MulticlassRecall(**per_class, zero_division=0),
            "f1": MulticlassF1Score(**per_class, zero_division=0),
            "confusion": MulticlassConfusionMatrix(num_classes),
        }
    )


class PerClassMetrics(Callback):
    """Track per-class metrics on the validation and test sets of any classifier.

    After each validation epoch and each test run it logs ``{stage}/{metric}/{class}`` for the
    metrics accuracy, precision, recall and F1 (per-class accuracy is the class's recall, as in
    torchmetrics), and the macro mean as ``{stage}/{metric}/macro``, over the classes that occur as a
    label or a prediction (as torchmetrics averages). The values are synced across DDP ranks, and the
    repeats that DDP pads an evaluation set with are left out, so they equal those of one process.
    Several evaluation dataloaders are pooled. Each epoch's values, their logged macro means
    (``"macro"``) and confusion matrix are appended to :attr:`history`, which is saved in checkpoints.

    The callback runs the module's ``forward`` on each evaluation batch's inputs, so the module
    needs no change as long as ``forward(x)`` returns logits.

    **Alerts.** After each validation epoch past the first ``warmup_epochs`` (while the model is
    still learning its classes), a class raises a rank-zero warning that names it, and
    ``val/alerts`` counts them, when

    * its recall or precision falls more than ``alert_margin`` below its best so far, or
    * the share of predictions given to it strays from its share of the labels by more than
      ``share_margin`` of that share (a class that takes others' samples, the mark of a targeted
      flip, or loses its own),

    and the change amounts to at least ``min_count`` samples, so that a small validation set does
    not alert on one or two errors. Only the validations of fit count as earlier epochs: a
    ``trainer.validate()`` before fit (a baseline) is judged but does not shorten the warm-up or
    set a best. When a callback restarts the model (PoisonFilter's restart),
    the alerts judge the new model against its own past only, after its own warm-up.

    The alerts of each epoch are kept in its history record under ``"alerts"``.

    Args:
        num_classes: number of classes.
        class_names: names used in the logged keys; defaults to ``"0"``, ``"1"``, ...
        input_key: where the inputs are in a batch; by default position 0 of a tuple or list, or a
            conventional dict key such as ``"image"``.
        target_key: where the labels are in a batch; by default position 1, or a key such as ``"label"``.
        alert_margin: the drop in recall or precision from its best that raises an alert; None: no such alert.
        share_margin: the relative gap between a class's prediction and label shares that raises an
            alert; None: no such alert.
        min_count: the fewest samples a change must amount to for an alert.
        warmup_epochs: epochs of fit without alerts at the start of training (however often each validates).

    Example:
        >>> from lightning.pytorch import Trainer
        >>> from robust_lightning.data import DigitsDataModule
        >>> from robust_lightning.models import SmallCNN
        >>> metrics = PerClassMetrics(num_classes=10)
        >>> trainer = Trainer(max_epochs=1, callbacks=[metrics], logger=False, enable_checkpointing=False,
        ...                   enable_progress_bar=False, enable_model_summary=False)
        >>> _ = trainer.test(SmallCNN(), datamodule=DigitsDataModule(), verbose=False)
        >>> record = metrics.history[-1]
        >>> record["stage"], len(record["recall"]), "test/f1/macro" in trainer.callback_metrics
        ('test', 10, True)
    """

    prefix = ""  # of the metric names in the logged keys

    def __init__(
        self,
        num_classes: int,
        class_names: Sequence[str] | None = None,
        input_key: Key | None = None,
        target_key: Key | None = None,
        alert_margin: float | None = 0.1,
        share_margin: float | None = 0.5,
        min_count: int = 5,
        warmup_epochs: int = 10,
    ) -> None:
        for name, margin in (("alert_margin", alert_margin), ("share_margin", share_margin)):
            if margin is not None and not (isinstance(margin, numbers.Real) and 0 < margin <= 1):
                raise ValueError(f"{name} must lie in (0, 1], or be None to turn its alert off; got {margin!r}.")
        if not isinstance(min_count, numbers.Integral) or min_count < 1:
            raise ValueError(f"min_count must be a positive integer, got {min_count!r}.")
        if not isinstance(warmup_epochs, numbers.Integral) or warmup_epochs < 0:
            raise ValueError(f"warmup_epochs must be a non-negative integer, got {warmup_epochs!r}.")
        if not isinstance(num_classes, numbers.Integral) or num_classes < 2:
            raise ValueError(f"num_classes must be an integer >= 2, got {num_classes!r}.")
        num_classes = int(num_classes)
        names = [str(c) for c in range(num_classes)] if class_names is None else [str(c) for c in class_names]
        if len(names) != num_classes or len(set(names)) != num_classes:
            raise ValueError(f"class_names must hold {num_classes} distinct names, got {list(class_names or [])}.")
        self.num_classes = num_classes
        self.class_names = names
        self.input_key = input_key
        self.target_key = target_key
        self.alert_margin, self.share_margin = alert_margin, share_margin
        self.min_count, self.warmup_epochs = int(min_count), int(warmup_epochs)
        self.history: list[dict[str, Any]] = []
        self.restarts: list[int] = []  # epochs at which the model (or its head) restarted
        self._keep_history = False
        self._weights_epoch: int | None = None  # the epoch of a checkpoint loaded for evaluation
        self._metrics: dict[str, MetricCollection] = {}
        self._seen: dict[tuple[str, int], int] = {}

    @property
    def state_key(self) -> str:
        return self._generate_state_key(num_classes=self.num_classes, class_names=self.class_names)

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        # Built here, in each process: built in __init__, ddp_spawn would share one CPU state between ranks.
        # Metrics held by a callback are not submodules, so they must be put on the module's device.
        self._metrics = {s: _collection(self.num_classes).to(pl_module.device) for s in _STAGES}
        self._seen = {}
        self._width_checked = False
        self._weights_epoch = None  # set again by on_load_checkpoint, which comes after setup, if one is loaded

    def _update(self, stage: str, trainer: Trainer, pl_module: LightningModule, batch: Any, loader_idx: int) -> None:
        if trainer.sanity_checking:
            return
        x = get_field(batch, resolve_key(batch, self.input_key, "input"))
        y = get_field(batch, resolve_key(batch, self.target_key, "target"))
        position = (_STAGES.index(stage), loader_idx, self._seen.get((stage, loader_idx), 0))
        logits = self._call(lambda: self._logits(trainer, pl_module, x, y, position), pl_module).detach()
        keep = self._real_samples(trainer, stage, loader_idx, len(y))
        if keep is not None:
            if not keep.any():
                return
            keep = keep.to(y.device)
            logits, y = logits[keep], y[keep]
        self._metrics[stage].update(logits, y)

    def _call(self, logits_of: Callable[[], Tensor], pl_module: LightningModule) -> Tensor:
        try:
            return logits_of()
        except NotImplementedError as error:
            raise NotImplementedError(
                f"{type(self).__name__} calls {type(pl_module).__name__}(x) to get logits. "
                "Add a forward(self, x) that returns the class logits."
            ) from error

    def _check_width(self, trainer: Trainer, pl_module: LightningModule, batch: Any) -> None:
        """Before the module's own step on the first evaluation batch (the sanity check's, in a fit), so that
        a model with too few outputs meets this message rather than an index error inside its loss."""
        self._width_checked = True
        x = get_field(batch, resolve_key(batch, self.input_key, "input"))
        logits = self._call(lambda: pl_module(x), pl_module)
        width = logits.shape[-1] if logits.ndim == 2 else None
        if width == self.num_classes:
            return
        data = getattr(trainer.datamodule, "num_classes", None)
        data_text = f"{type(trainer.datamodule).__name__}.num_classes is {data}" if data is not None else "unset"
        raise ValueError(
            f"The number of classes disagrees: {type(pl_module).__name__} outputs logits of shape "
            f"{tuple(logits.shape)} ({width} classes), {type(self).__name__} has num_classes={self.num_classes} "
            f"(the config's), and the data's is {data_text}. Fix: give the model one output per class and "
            "the same num_classes to the config and the data."
        )

    def _logits(
        self, trainer: Trainer, pl_module: LightningModule, x: Tensor, y: Tensor, position: tuple[int, ...]
    ) -> Tensor:
        """The logits the metrics judge; a subclass may judge other inputs (adversarial ones).

        ``position`` (stage, loader, samples before this batch) tells the batch apart within the epoch.
        """
        return pl_module(x)

    def _real_samples(self, trainer: Trainer, stage: str, loader_idx: int, count: int) -> Tensor | None:
        """Mask out the repeats that DDP pads evaluation sets with, so the counts match one process."""
        loader = as_loader_list(trainer.val_dataloaders if stage == "val" else trainer.test_dataloaders)[loader_idx]
        start = self._seen.get((stage, loader_idx), 0)
        self._seen[(stage, loader_idx)] = start + count
        return _not_padding(getattr(loader, "sampler", None), start, count)

    def _log(self, stage: str, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.sanity_checking:
            return
        collection = self._metrics[stage]
        values = collection.compute()  # a collective under DDP
        collection.reset()
        self._seen = {key: n for key, n in self._seen.items() if key[0] != stage}
        present = _present(values["confusion"])
        scalars = {}
        for metric in METRICS:
            key = f"{stage}/{self.prefix}{metric}"
            scalars[f"{key}/macro"] = values[metric][present].mean()
            scalars.update({f"{key}/{name}": v for name, v in zip(self.class_names, values[metric])})
        fitting = trainer.state.fn == TrainerFn.FITTING
        epoch = trainer.current_epoch if fitting or self._weights_epoch is None else self._weights_epoch
        record = {"stage": stage, "epoch": epoch, "fitting": fitting}
        record.update({metric: values[metric].tolist() for metric in METRICS})
        record["confusion"] = values["confusion"].tolist()
        record["support"] = values["confusion"].sum(1).tolist()
        record["macro"] = {metric: float(scalars[f"{stage}/{self.prefix}{metric}/macro"]) for metric in METRICS}
        if stage == "val" and not self.prefix:
            record["alerts"] = self._alerts(record)
            scalars["val/alerts"] = torch.tensor(float(len(record["alerts"])))
            for alert in record["alerts"]:
                rank_zero_warn(f"PerClassMetrics, epoch {trainer.current_epoch}: {alert}", category=ClassAlert)
        pl_module.log_dict(scalars)
        self.history.append(record)

    def _alerts(self, record: dict[str, Any]) -> list[str]:
        """What the new validation record shows against the history: the messages name each class."""
        alerts: list[str] = []
        since = self.restarts[-1] if self.restarts else 0
        # A trainer.validate() outside fit (a baseline before training) is neither a training epoch nor a best to keep.
        earlier = [r for r in self.history if r["stage"] == "val" and r.get("fitting", True) and r["epoch"] >= since]
        trained = {r["epoch"] for r in earlier if r["epoch"] < record["epoch"]}  # epochs, however often each validates
        if len(trained) < self.warmup_epochs:
            return alerts
        confusion = torch.tensor(record["confusion"])
        labels, predictions = confusion.sum(1), confusion.sum(0)
        if self.alert_margin is not None and earlier:
            for metric, counts in (("recall", labels), ("precision", predictions)):
                best = torch.tensor([r[metric] for r in earlier]).amax(0)
                now = torch.tensor(record[metric])
                fallen = (now < best - self.alert_margin) & ((best - now) * counts >= self.min_count)
                for c in fallen.nonzero().flatten().tolist():
                    alerts.append(
                        f"class {self.class_names[c]!r} {metric} fell to {now[c]:.3f}, "
                        f"{best[c] - now[c]:.3f} below its best ({best[c]:.3f})"
                    )
        if self.share_margin is not None:
            gap = predictions - labels
            odd = (gap.abs() > self.share_margin * labels) & (gap.abs() >= self.min_count)
            total = max(int(labels.sum()), 1)
            for c in odd.nonzero().flatten().tolist():
                alerts.append(
                    f"class {self.class_names[c]!r} gets {100 * predictions[c] / total:.1f}% of the predictions "
                    f"but holds {100 * labels[c] / total:.1f}% of the labels"
                )
        return alerts

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        if not self._width_checked:
            self._check_width(trainer, pl_module, batch)

    def on_test_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        if not self._width_checked:
            self._check_width(trainer, pl_module, batch)

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self._update("val", trainer, pl_module, batch, dataloader_idx)

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self._update("test", trainer, pl_module, batch, dataloader_idx)

    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._log("val", trainer, pl_module)

    def on_test_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._log("test", trainer, pl_module)

    def last(self, stage: str) -> dict[str, Any]:
        """The latest record of ``stage`` ("val" or "test") in the history."""
        for record in reversed(self.history):
            if record["stage"] == stage:
                return record
        raise LookupError(f"PerClassMetrics has no {stage} results yet; run trainer.validate or trainer.test first.")

    def on_model_restart(self, trainer: Trainer) -> None:
        self.restarts.append(trainer.current_epoch)

    def state_dict(self) -> dict[str, Any]:
        return {"history": [dict(record) for record in self.history], "restarts": list(self.restarts)}

    def on_load_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]) -> None:
        # Testing a checkpoint (e.g. ckpt_path="best") of the fit this callback just watched must not roll its
        # history back to that checkpoint's; resuming fit, or a fresh callback, takes the checkpoint's history.
        evaluating = trainer.state.fn != TrainerFn.FITTING
        self._keep_history = evaluating and bool(self.history)
        # Evaluating a checkpoint evaluates its weights: its records carry the epoch that saved them.
        self._weights_epoch = checkpoint.get("epoch") if evaluating else None

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if self._keep_history:
            self._keep_history = False
            return
        self.history = [dict(record) for record in state_dict["history"]]
        self.restarts = list(state_dict.get("restarts", []))  # absent from checkpoints of earlier versions
