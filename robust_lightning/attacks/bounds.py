"""Where valid inputs live, and the affine map to the unit box that torchattacks works in.

torchattacks clamps every input to [0, 1]. Normalized images and feature vectors live
elsewhere, so the attacks run on :class:`UnitBoxModel`, which maps the unit box back to the
data's own range before the model sees it: nothing is clamped to the wrong range, and ``eps``
is measured in units of the range (pixel units for images, a fraction of each feature's span).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import torch
from lightning.pytorch import LightningDataModule
from lightning.pytorch.utilities.model_helpers import is_overridden
from torch import Tensor, nn

TOLERANCE = 1e-5  # float rounding of a normalization, not a real excursion


class InputBounds:
    """Per-element ``low`` and ``high`` of valid inputs, broadcastable to one sample.

    Args:
        low: a number, or a tensor shaped like (a broadcastable view of) one sample, e.g.
            ``(C, 1, 1)`` per channel or ``(F,)`` per feature.
        high: the same for the upper bound.

    Example:
        >>> bounds = InputBounds.normalized(mean=[0.5], std=[0.25])
        >>> bounds.low.flatten().tolist(), bounds.high.flatten().tolist()
        ([-2.0], [2.0])
        >>> bounds.from_unit(torch.tensor([[[[0.75]]]])).item()  # pixel 0.75, normalized
        1.0
    """

    def __init__(self, low: float | Sequence[float] | Tensor = 0.0, high: float | Sequence[float] | Tensor = 1.0):
        self.low, self.high = torch.as_tensor(low, dtype=torch.float32), torch.as_tensor(high, dtype=torch.float32)
        try:
            span = self.high - self.low
        except RuntimeError as error:
            raise ValueError(f"low and high must have broadcastable shapes: {error}") from None
        if not (torch.isfinite(self.low).all() and torch.isfinite(self.high).all()) or (span <= 0).any():
            raise ValueError("InputBounds needs finite bounds with low < high everywhere.")
        # The bounds torchattacks assumes: no mapping needed. Decided once, on the CPU.
        self.is_unit = bool((self.low == 0).all() and (self.high == 1).all())

    @classmethod
    def normalized(cls, mean: Sequence[float], std: Sequence[float]) -> InputBounds:
        """The range of images in [0, 1] after ``(x - mean) / std`` per channel (torchvision's Normalize)."""
        mean, std = torch.as_tensor(mean, dtype=torch.float32), torch.as_tensor(std, dtype=torch.float32)
        if mean.shape != std.shape or mean.ndim != 1 or (std <= 0).any():
            raise ValueError("mean and std must be per-channel sequences of the same length, with std > 0.")
        return cls((0 - mean)[:, None, None] / std[:, None, None], (1 - mean)[:, None, None] / std[:, None, None])

    @classmethod
    def from_data(cls, datamodule: Any, input_key: Any = None) -> InputBounds:
        """Per-element bounds from the data: the least and the greatest value each element takes.

        For tabular or normalized inputs whose range is not known up front. Reads the datamodule's
        training, validation and test loaders once each (those it has), so that no input the run
        evaluates lies outside the bounds; an element that never varies gets a span of 1e-6 around
        its value.
        """
        from robust_lightning.data.fields import get_field, resolve_key  # data imports attacks, not the reverse

        datamodule = getattr(datamodule, "datamodule", datamodule)  # a RobustDataModule: the user's own
        low = high = None
        for batch in _batches(datamodule):
            x = torch.as_tensor(get_field(batch, resolve_key(batch, input_key, "input"))).float()
            least, greatest = x.amin(0), x.amax(0)
            low = least if low is None else torch.minimum(low, least)
            high = greatest if high is None else torch.maximum(high, greatest)
        if low is None:
            raise ValueError("InputBounds.from_data read no batch: the datamodule's loaders are empty.")
        return cls(low, torch.where(high > low, high, low + 1e-6))

    def to(self, device: torch.device | str) -> InputBounds:
        moved = InputBounds.__new__(InputBounds)
        moved.low, moved.high, moved.is_unit = self.low.to(device), self.high.to(device), self.is_unit
        return moved

    def to_unit(self, x: Tensor) -> Tensor:
        return (x - self.low) / (self.high - self.low)

    def from_unit(self, u: Tensor) -> Tensor:
        return self.low + u * (self.high - self.low)

    def check(self, x: Tensor, what: str = "The inputs") -> None:
        """Refuse inputs outside the bounds: an attack would clamp them into the box and change them."""
        below, above = x < self.low - TOLERANCE, x > self.high + TOLERANCE
        if below.any() or above.any():
            raise ValueError(
                f"{what} range over [{x.min().item():.4g}, {x.max().item():.4g}], outside the attack's bounds "
                f"[{self.low.min().item():.4g}, {self.high.max().item():.4g}], so the attack would clamp them. Say "
                "where your inputs live: bounds=InputBounds.normalized(mean, std) for normalized images, or "
                "InputBounds(low, high) per feature."
            )

    def __repr__(self) -> str:
        return f"InputBounds(low={self.low.tolist()}, high={self.high.tolist()})"


class UnitBoxModel(nn.Module):
    """``model`` seen from the unit box: ``forward(u) = model(low + u * (high - low))``, in ``u``'s dtype."""

    def __init__(self, model: nn.Module, bounds: InputBounds) -> None:
        super().__init__()
        self.model, self.bounds = model, bounds
        # torchattacks puts a model it found in train mode back into train mode (recursively) after
        # attacking; the wrapper is built for the attack, so it must not pass for a training model.
        self.training = False

    def forward(self, u: Tensor) -> Tensor:
        return self.model(self.bounds.from_unit(u).to(u.dtype))


def _batches(datamodule: Any) -> Iterator[Any]:
    """Every batch of the training, validation and test loaders that the datamodule defines."""
    for stage, splits in (("fit", ("train", "val")), ("test", ("test",))):
        datamodule.setup(stage)
        for split in splits:
            if is_overridden(f"{split}_dataloader", datamodule, LightningDataModule):
                yield from getattr(datamodule, f"{split}_dataloader")()
