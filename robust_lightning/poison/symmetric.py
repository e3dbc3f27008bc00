"""Symmetric (uniform) label noise."""

from __future__ import annotations

import torch
from torch import Tensor

from robust_lightning.poison.base import LabelPoison, check_rate, count_for


def symmetric_noise(labels: Tensor, num_classes: int, rate: float, generator: torch.Generator) -> Tensor:
    """Functional form of :class:`SymmetricNoise`.

    Exactly ``round(rate * n)`` samples are moved, each to a class drawn uniformly among the
    *other* ``num_classes - 1`` classes. Some codebases also draw the true class, so that
    fewer labels change than the rate says; here every chosen label changes.

    >>> labels = torch.zeros(10, dtype=torch.long)
    >>> int((symmetric_noise(labels, 3, 0.4, torch.Generator().manual_seed(0)) != 0).sum())
    4
    """
    rate = check_rate(rate)
    if num_classes < 2:
        raise ValueError(f"Symmetric noise needs at least 2 classes, got num_classes={num_classes}.")
    chosen = torch.randperm(len(labels), generator=generator)[: count_for(rate, len(labels))]
    shift = torch.randint(1, num_classes, (len(chosen),), generator=generator)
    noisy = labels.clone()
    noisy[chosen] = (labels[chosen] + shift) % num_classes
    return noisy


class SymmetricNoise(LabelPoison):
    """Move a fraction of all labels, each to a different class chosen uniformly.

    Example:
        >>> import torch
        >>> result = SymmetricNoise(rate=0.4, seed=1)(torch.arange(10) % 10, num_classes=10)
        >>> int(result.mask.sum())
        4
    """

    def select(self, labels: Tensor, num_classes: int, generator: torch.Generator) -> Tensor:
        return symmetric_noise(labels, num_classes, self.rate, generator)
