"""Read a model's features (penultimate representation) and logits without changing the model."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from lightning.pytorch import LightningModule, Trainer
from torch import Tensor, nn
from torch.nn.modules.loss import _Loss
from torchmetrics import Metric

from robust_lightning.data.fields import Key, get_field, resolve_key
from robust_lightning.losses.base import RobustLossBase

# Modules a LightningModule holds as attributes that are not part of its forward pass.
LOSSES = (_Loss, RobustLossBase)
NOT_FORWARD = (*LOSSES, Metric)

# Leaves that may sit between the Linear layers of a classifier head.
_HEAD_PARTS = (nn.Linear, nn.Flatten, nn.Identity, nn.Dropout, nn.ReLU, nn.GELU, nn.SiLU, nn.Tanh, nn.LeakyReLU)


def head_input(module: nn.Module, owner: str = "This callback") -> nn.Module:
    """The first Linear of the model's classifier head: its input is the representation callbacks read.

    The head is the trailing run of leaf modules made of Linear layers, activations, dropout and
    flatten (in registration order): the pooled features of a CNN such as SmallCNN, the input of a
    ResNet's ``fc``. When that run is the whole model (an MLP), it is the last Linear instead, whose
    input is the penultimate layer.
    """
    return classifier_head(module, owner)[0]


def classifier_head(module: nn.Module, owner: str = "This callback") -> list[nn.Module]:
    """The Linear layers of the model's classifier head (see :func:`head_input`), in order.

    >>> from robust_lightning.models import SmallCNN
    >>> [layer.out_features for layer in classifier_head(SmallCNN())]
    [64, 10]
    """
    leaves = [m for m in module.modules() if not list(m.children()) and not isinstance(m, NOT_FORWARD)]
    linears = [m for m in leaves if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError(
            f"{owner} reads features at the input of the classifier head of {type(module).__name__}, which has "
            "no nn.Linear. Pass layer='<name of a submodule>' whose output are the features."
        )
    start = len(leaves)
    while start > 0 and isinstance(leaves[start - 1], _HEAD_PARTS):
        start -= 1
    head = [m for m in leaves[start:] if isinstance(m, nn.Linear)]
    return head if start > 0 and head else linears[-1:]


def gather_rows(trainer: Trainer, rows: Tensor) -> Tensor:
    """Every rank's rows, concatenated in rank order; ranks may hold different numbers of rows."""
    if trainer.world_size == 1:
        return rows
    strategy = trainer.strategy
    device = strategy.root_device
    sizes = strategy.all_gather(torch.tensor([len(rows)], device=device)).flatten().tolist()
    padded = torch.zeros((max(sizes), *rows.shape[1:]), dtype=rows.dtype, device=device)
    padded[: len(rows)] = rows.to(device)
    gathered = strategy.all_gather(padded).cpu()
    return torch.cat([gathered[rank, :size] for rank, size in enumerate(sizes)])


class FeatureTap:
    """Forward hooks that catch the features and logits of the module's forward passes while recording.

    Features are the input of the classifier head (:func:`head_input`), or the output of the
    submodule named ``layer``; logits are what ``forward`` returns when it is a 2-D tensor.

    Example:
        >>> from robust_lightning.models import SmallCNN
        >>> model, tap = SmallCNN(), FeatureTap("Example")
        >>> tap.attach(model)
        >>> tap.start(); _ = model(torch.rand(3, 1, 8, 8)); tap.stop()
        >>> tuple(tap.captured["features"].shape), tuple(tap.captured["logits"].shape)
        ((3, 256), (3, 10))
        >>> tap.detach()
    """

    side_forwards = 0  # open side_forward() blocks, whose forward passes no tap records

    def __init__(self, owner: str, layer: str | None = None) -> None:
        self.owner, self.layer = owner, layer
        self.captured: dict[str, Tensor] = {}
        self.recording = False
        self._handles: list[Any] = []
        self._projections: dict[tuple[int, int, torch.device], Tensor] = {}

    def flat_inputs(self, inputs: Any, max_dims: int | None) -> Tensor:
        """The inputs as one row per sample on the CPU, reduced to ``max_dims`` values by a seeded projection when wider."""
        if not isinstance(inputs, Tensor):
            raise TypeError(
                f"{self.owner} reads the inputs of each batch, which must be one tensor, got {type(inputs).__name__}. "
                "For PoisonFilter, pass screen=[...] and detectors=[...] without 'input_spectral'."
            )
        flat = inputs.detach().flatten(1).float()
        width = flat.shape[1]
        if max_dims is None or width <= max_dims:
            return flat.cpu()
        key = (width, max_dims, flat.device)
        if key not in self._projections:
            # Johnson-Lindenstrauss: a Gaussian projection keeps distances, so spectral scores survive it.
            generator = torch.Generator().manual_seed(0)
            matrix = torch.randn(width, max_dims, generator=generator) / max_dims**0.5
            self._projections[key] = matrix.to(flat.device)
        return (flat @ self._projections[key]).cpu()

    def attach(self, pl_module: nn.Module) -> None:
        self.detach()
        feature_module = pl_module.get_submodule(self.layer) if self.layer else head_input(pl_module, self.owner)
        self._handles = [
            feature_module.register_forward_hook(self._record_features),
            pl_module.register_forward_hook(self._record_logits),
        ]

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self.recording = False

    def start(self) -> None:
        self.captured, self.recording = {}, True

    def stop(self) -> None:
        self.recording = False

    def _record_features(self, module: nn.Module, inputs: tuple, output: Any) -> None:
        if self.recording and not FeatureTap.side_forwards:
            features = output if self.layer else inputs[0]
            self.captured["features"] = features.detach().flatten(1)

    def _record_logits(self, module: nn.Module, inputs: tuple, output: Any) -> None:
        if self.recording and not FeatureTap.side_forwards and isinstance(output, Tensor) and output.ndim == 2:
            self.captured["logits"] = output.detach()

    def check(self, pl_module: nn.Module) -> None:
        """Say what to change when the last forward pass gave no logits or no features."""
        if "logits" not in self.captured:
            raise TypeError(
                f"{self.owner} reads the logits from {type(pl_module).__name__}.forward(x), which must return a 2-D "
                "tensor (batch, classes); it returned something else. Return the logits from forward (and compute "
                "anything else in training_step)."
            )
        if "features" not in self.captured:
            raise RuntimeError(
                f"{self.owner}'s feature hook ({self.layer or 'the classifier head input'}) did not run during "
                f"{type(pl_module).__name__}.forward(x). Pass layer='<name of a submodule forward uses>'."
            )

    @torch.no_grad()
    def forward(self, trainer: Trainer, pl_module: LightningModule, inputs: Any) -> dict[str, Tensor]:
        """Features and logits of one forward pass over ``inputs`` under the trainer's precision, on the CPU."""
        self.start()
        with trainer.precision_plugin.forward_context():
            pl_module(inputs)  # converted to the precision's dtype with the batch
        self.stop()
        self.check(pl_module)
        return {"features": self.captured["features"].float().cpu(), "logits": self.captured["logits"].float().cpu()}

    @torch.no_grad()
    def read(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        batch: Any,
        input_key: Key | None = None,
        target_key: Key | None = None,
        with_inputs: bool = False,
        max_input_dims: int | None = None,
    ) -> dict[str, Tensor]:
        """Features, logits and labels of one collated batch, prepared as a training batch, on the CPU.

        With ``with_inputs`` the inputs come back too, flattened to one row per sample; rows wider
        than ``max_input_dims`` are reduced on their device by a seeded Gaussian projection, the
        same for a given width on every rank and call. Call it inside :meth:`evaluating`.
        """
        batch = as_training_batch(trainer, batch)
        inputs = get_field(batch, resolve_key(batch, input_key, "input"))
        rows = self.forward(trainer, pl_module, inputs)
        rows["labels"] = torch.as_tensor(get_field(batch, resolve_key(batch, target_key, "target"))).long().cpu()
        if with_inputs:
            rows["inputs"] = self.flat_inputs(inputs, max_input_dims)
        return rows

    @contextmanager
    def evaluating(self, pl_module: LightningModule) -> Iterator[None]:
        """The module in eval mode for reading, put back in its mode afterwards."""
        was_training = pl_module.training
        pl_module.eval()
        try:
            yield
        finally:
            self.stop()
            pl_module.train(was_training)

    def embed(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        batches: Iterable[Any],
        input_key: Key | None = None,
        target_key: Key | None = None,
        gather: bool = True,
        with_inputs: bool = False,
    ) -> dict[str, Tensor]:
        """Features, logits and labels (and inputs) of every batch in eval mode (:meth:`read`), gathered from all ranks.

        With ``gather=False`` each rank keeps its own rows, for batches every rank reads whole.
        """
        with self.evaluating(pl_module):
            parts = [self.read(trainer, pl_module, batch, input_key, target_key, with_inputs) for batch in batches]
        rows = {key: torch.cat([part[key] for part in parts]) for key in parts[0]} if parts else {}
        return {key: gather_rows(trainer, part) for key, part in rows.items()} if gather else rows


@contextmanager
def side_forward() -> Iterator[None]:
    """Forward passes that a callback adds to a training step on other inputs than the batch's.

    TRADES' adversarial term and the pseudo-label batch run inside the step, after the module's own
    forward; no :class:`FeatureTap` records them, so taps keep the batch's features and logits.
    """
    FeatureTap.side_forwards += 1
    try:
        yield
    finally:
        FeatureTap.side_forwards -= 1


def as_training_batch(trainer: Trainer, batch: Any) -> Any:
    """A collated batch prepared as Lightning prepares a training batch: precision, the batch hooks, the device.

    The same order as Lightning's training loop, so that a user's ``on_before_batch_transfer`` and
    ``on_after_batch_transfer`` (normalization, reshaping) shape the batches callbacks read too.
    """
    batch = trainer.precision_plugin.convert_input(batch)
    batch = trainer.lightning_module._on_before_batch_transfer(batch, dataloader_idx=0)
    return trainer.strategy.batch_to_device(batch, dataloader_idx=0)
