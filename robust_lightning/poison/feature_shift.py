"""Feature manipulation: move samples of one class toward another while their labels stay."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from robust_lightning.poison.base import InputPoison, count_for


def feature_shift(x: Tensor, direction: Tensor, strength: float, low: float, high: float) -> Tensor:
    """Functional form of :class:`FeatureShift`: ``x + strength * direction``, kept within ``[low, high]``.

    >>> feature_shift(torch.tensor([0.2, 0.9]), torch.tensor([1.0, 1.0]), 0.5, 0.0, 1.0)
    tensor([0.7000, 1.0000])
    """
    return (x + strength * direction).clamp(low, high)


class FeatureShift(InputPoison):
    """Move ``round(rate * n_source)`` samples of ``source`` toward ``target``; their labels stay ``source``.

    The shift is ``strength`` times the difference of the two class means in input space, and
    the result stays within the range of values seen in the training inputs, so every shifted
    sample still looks valid. At ``strength=1`` the shifted samples are centred on the target class.

    Args:
        source: the class whose samples move.
        target: the class they move toward.
        rate: fraction of the source class that moves, in [0, 1).
        strength: how far, as a fraction of the distance between the class means; positive.
        seed: makes the choice of samples reproducible.

    Example:
        >>> drill = FeatureShift(source=0, target=1, rate=0.5, strength=1.0)
        >>> x, y = torch.tensor([[0.0], [0.2], [1.0], [0.8]]), torch.tensor([0, 0, 1, 1])
        >>> drill.prepare(lambda ids: x[ids], y)
        >>> result = drill(y, num_classes=2)
        >>> result.labels.tolist(), int(result.mask.sum()), round(float(drill.poison_input(x[0])), 4)
        ([0, 0, 1, 1], 1, 0.8)
    """

    def __init__(self, source: int, target: int, rate: float, strength: float = 0.5, seed: int = 0) -> None:
        super().__init__(rate, seed)
        if int(source) == int(target):
            raise ValueError(f"FeatureShift needs two different classes, got source=target={source}.")
        if not strength > 0:
            raise ValueError(f"strength must be positive, got {strength!r}; 1.0 moves samples onto the target mean.")
        self.source, self.target, self.strength = int(source), int(target), float(strength)
        self._direction: Tensor | None = None
        self._bounds = (0.0, 0.0)

    def prepare(self, read_inputs: Callable[[Tensor], Tensor], labels: Tensor) -> None:
        inputs = []
        for cls in (self.source, self.target):
            ids = (labels == cls).nonzero().flatten()
            if len(ids) == 0:
                raise ValueError(f"FeatureShift: the training set has no sample of class {cls}.")
            inputs.append(read_inputs(ids).float())
        means = [x.mean(0) for x in inputs]
        self._bounds = (min(float(x.min()) for x in inputs), max(float(x.max()) for x in inputs))
        self._direction = means[1] - means[0]

    def choose(self, labels: Tensor, num_classes: int, generator: torch.Generator) -> Tensor:
        outside = [c for c in (self.source, self.target) if not 0 <= c < num_classes]
        if outside:
            raise ValueError(f"FeatureShift classes {outside} lie outside [0, {num_classes}).")
        members = (labels == self.source).nonzero().flatten()
        mask = torch.zeros(len(labels), dtype=torch.bool)
        mask[members[torch.randperm(len(members), generator=generator)[: count_for(self.rate, len(members))]]] = True
        return mask

    def poison_input(self, x: Tensor) -> Tensor:
        if self._direction is None:
            raise RuntimeError("FeatureShift.prepare() must see the training inputs first (RobustDataModule does).")
        return feature_shift(x, self._direction.to(x.dtype), self.strength, *self._bounds)
