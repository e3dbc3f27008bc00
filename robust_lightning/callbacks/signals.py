"""Signal collection for PoisonFilter: margins while training, and features, logits and inputs at each round."""

from __future__ import annotations

from typing import Any

import torch
from lightning.pytorch import LightningModule, Trainer
from torch import Tensor

from robust_lightning.callbacks.embedding import FeatureTap
from robust_lightning.data.fields import Key, get_field, resolve_key
from robust_lightning.data.loader import as_loader_list
from robust_lightning.data.robust import RobustDataModule
from robust_lightning.detectors import Signals, margins_of
from robust_lightning.detectors.base import chunks

# Inputs wider than this reach the input detectors projected (FeatureTap's seeded Gaussian projection).
MAX_INPUT_DIMS = 1024


class SignalCollector:
    """Reads the per-sample signals that detectors judge, into buffers indexed by sample id.

    While training, the margin of each sample's given label is summed from the logits of its
    training step. At a round, one inference pass over the training set (excluded samples
    included) writes features, logits, labels and, when asked, flattened inputs into buffers
    allocated once per round, each row at its sample id; under DDP each rank fills its share and
    one in-place sum per buffer makes them whole on every rank. The trusted reference is read from
    the datamodule's ``val_dataloader()`` whole on every rank, whether or not the module validates.

    Example:
        >>> from lightning.pytorch import Trainer
        >>> from robust_lightning import RobustDataModule
        >>> from robust_lightning.data import DigitsDataModule
        >>> from robust_lightning.models import SmallCNN
        >>> data, model = RobustDataModule(DigitsDataModule()), SmallCNN()
        >>> trainer = Trainer(max_epochs=1, limit_train_batches=1, logger=False, enable_checkpointing=False,
        ...                   enable_progress_bar=False, enable_model_summary=False)
        >>> trainer.fit(model, datamodule=data)
        >>> collector = SignalCollector("Example")
        >>> collector.attach(model, data)
        >>> signals = collector.collect(trainer, model, with_inputs=True, with_reference=True)
        >>> tuple(signals.features.shape), tuple(signals.inputs.shape), len(signals.reference_labels)
        ((1293, 256), (1293, 64), 144)
    """

    def __init__(
        self, owner: str, layer: str | None = None, input_key: Key | None = None, target_key: Key | None = None
    ) -> None:
        self.tap = FeatureTap(owner, layer)
        self.input_key, self.target_key = input_key, target_key
        self.data: RobustDataModule | None = None
        self.margin_sum: Tensor | None = None
        self.margin_count: Tensor | None = None
        self._epoch_sum: Tensor | None = None
        self._epoch_count: Tensor | None = None

    def attach(self, pl_module: LightningModule, data: RobustDataModule) -> None:
        self.tap.attach(pl_module)
        self.data = data

    def detach(self) -> None:
        self.tap.detach()

    # ---------------------------------------------------------------- margins
    def start_margins(self, n: int) -> None:
        """Fresh margin sums for ``n`` samples, unless a checkpoint brought them back."""
        if self.margin_sum is None:
            self.margin_sum, self.margin_count = torch.zeros(n), torch.zeros(n)
        self._epoch_sum, self._epoch_count = torch.zeros(n), torch.zeros(n)

    def record_margins(self, batch: Any, ids: Tensor | None) -> None:
        """Add the margins of the training step's logits, when its last forward was over this batch."""
        logits = self.tap.captured.get("logits")
        if logits is None or ids is None or len(logits) != len(ids):
            return  # a step whose last forward was not over this batch (e.g. an attack's): nothing to record
        labels = torch.as_tensor(get_field(batch, resolve_key(batch, self.target_key, "target")))
        self._epoch_sum.index_add_(0, ids, margins_of(logits.float(), labels.long().to(logits.device)).cpu())
        self._epoch_count.index_add_(0, ids, torch.ones(len(ids)))

    def end_epoch(self, trainer: Trainer) -> None:
        """Add this epoch's margins, summed over ranks."""
        for total, part in ((self.margin_sum, self._epoch_sum), (self.margin_count, self._epoch_count)):
            total += trainer.strategy.reduce(part.to(trainer.strategy.root_device), reduce_op="sum").cpu()
            part.zero_()

    @property
    def margins(self) -> Tensor | None:
        """Mean margin per sample over training, NaN for a sample never trained on; None before any recording."""
        counts = self.margin_count
        if counts is None:
            return None
        return torch.where(counts > 0, self.margin_sum / counts.clamp_min(1), torch.nan).float()

    # ---------------------------------------------------------------- a round
    @torch.no_grad()
    def collect(self, trainer: Trainer, pl_module: LightningModule, with_inputs: bool, with_reference: bool) -> Signals:
        """The signals of every training sample, in id order, and of the trusted reference when asked."""
        train = self._read_training_set(trainer, pl_module, with_inputs)
        reference = self._read_reference(trainer, pl_module, with_inputs) if with_reference else {}
        return Signals(
            labels=train["labels"],
            num_classes=self.data.num_classes,
            features=train["features"],
            logits=train["logits"],
            margins=self.margins,
            reference_features=reference.get("features"),
            reference_labels=reference.get("labels"),
            inputs=train.get("inputs"),
            reference_inputs=reference.get("inputs"),
            excluded=self.data.excluded,
        )

    def _read_training_set(self, trainer: Trainer, pl_module: LightningModule, with_inputs: bool) -> dict[str, Tensor]:
        n = self.data.num_train
        buffers: dict[str, Tensor] = {}
        written = torch.zeros(n, dtype=torch.long)
        for ids, rows in self._read(trainer, pl_module, self.data.inspection_dataloader(), with_inputs):
            for key, values in rows.items():
                if key not in buffers:
                    buffers[key] = torch.zeros((n, *values.shape[1:]), dtype=values.dtype)
                buffers[key][ids] = values
            written[ids] += 1
        if trainer.world_size > 1:
            written = _sum_over_ranks(trainer, written)
            for key, buffer in buffers.items():  # the repeats DDP pads a shard with were written twice
                _sum_over_ranks(trainer, buffer).div_(
                    written.view(-1, *[1] * (buffer.ndim - 1)).to(buffer.dtype), **_exact(buffer)
                )
        if bool((written == 0).any()):
            raise RuntimeError("The inspection pass missed some training ids; this is a bug, please report it.")
        return buffers

    def _read_reference(self, trainer: Trainer, pl_module: LightningModule, with_inputs: bool) -> dict[str, Tensor]:
        parts = [
            rows
            for loader in as_loader_list(self.data.val_dataloader())
            for _, rows in self._read(trainer, pl_module, ((batch, None) for batch in loader), with_inputs)
        ]
        return {key: torch.cat([part[key] for part in parts]) for key in parts[0]} if parts else {}

    def _read(self, trainer: Trainer, pl_module: LightningModule, batches: Any, with_inputs: bool):
        """The ids of each ``(batch, ids)`` with the batch's rows (see :meth:`FeatureTap.read`), in eval mode."""
        keys = (self.input_key, self.target_key)
        with self.tap.evaluating(pl_module):
            for batch, ids in batches:
                yield ids, self.tap.read(trainer, pl_module, batch, *keys, with_inputs, MAX_INPUT_DIMS)


def _exact(buffer: Tensor) -> dict[str, str]:
    """Integer buffers divide by their write counts exactly."""
    return {} if buffer.is_floating_point() else {"rounding_mode": "floor"}


def _sum_over_ranks(trainer: Trainer, buffer: Tensor) -> Tensor:
    """Sum ``buffer`` over the ranks in place, a chunk of rows at a time, so device memory stays bounded."""
    device = trainer.strategy.root_device
    width = buffer[0].numel() if len(buffer) else 1
    for rows in chunks(len(buffer), width):
        buffer[rows] = trainer.strategy.reduce(buffer[rows].to(device), reduce_op="sum").cpu()
    return buffer
