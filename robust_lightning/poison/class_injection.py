"""Biased injection: near-duplicates of one class added to the training set."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from robust_lightning.poison.base import Injection, InjectionPoison, check_labels, count_for


def near_duplicates_of(inputs: Tensor, noise: float, low: Tensor, high: Tensor, generator: torch.Generator) -> Tensor:
    """``inputs`` plus Gaussian noise of std ``noise``, kept within ``[low, high]`` and in the inputs' dtype.

    Integer inputs (uint8 images, say) are rounded back, so a batch never mixes dtypes; ``noise``
    is in the inputs' own units.
    """
    work = inputs if inputs.is_floating_point() else inputs.float()
    noisy = (work + noise * torch.randn(inputs.shape, generator=generator).to(work.dtype)).clamp(
        float(low), float(high)
    )
    return noisy.to(inputs.dtype) if inputs.is_floating_point() else noisy.round().to(inputs.dtype)


class ClassInjection(InjectionPoison):
    """Add ``round(fraction * n)`` slightly perturbed copies of class ``target``'s training samples.

    Each copy is a random sample of class ``target`` (drawn with replacement) plus Gaussian noise
    of std ``noise``, clipped to the range of that class's inputs, and labelled ``target``, or
    ``relabel`` when given. The training set then leans toward one outcome: data biased toward
    a class, or (with ``relabel``) a class pushed into another's region.

    Example:
        >>> labels = torch.tensor([0, 0, 1, 1, 1])
        >>> inputs = torch.rand(5, 3)
        >>> added = ClassInjection(target=1, fraction=0.4).inject(lambda ids: inputs[ids], labels, num_classes=2)
        >>> added.labels.tolist(), bool((labels[added.sources] == 1).all())
        ([1, 1], True)
    """

    def __init__(
        self, target: int, fraction: float, noise: float = 0.03, relabel: int | None = None, seed: int = 0
    ) -> None:
        super().__init__(fraction, seed)
        if not noise >= 0:
            raise ValueError(f"noise must be a non-negative std, got {noise!r}.")
        if relabel is not None and relabel == target:
            raise ValueError("relabel must name another class than target, or be None to keep the label.")
        self.target, self.noise, self.relabel = int(target), float(noise), relabel

    def inject(self, read_inputs: Callable[[Tensor], Tensor], labels: Tensor, num_classes: int) -> Injection:
        labels = check_labels(labels, num_classes)
        for name, cls in (("target", self.target), ("relabel", self.relabel)):
            if cls is not None and not 0 <= cls < num_classes:
                raise ValueError(f"{name}={cls} is not a class in [0, {num_classes}).")
        pool = (labels == self.target).nonzero().flatten()
        if len(pool) == 0:
            raise ValueError(f"ClassInjection copies class {self.target}, which has no training sample.")
        generator = torch.Generator().manual_seed(self.seed)
        count = count_for(self.fraction, len(labels))
        drawn = torch.randint(len(pool), (count,), generator=generator)
        class_inputs = read_inputs(pool)
        inputs = near_duplicates_of(class_inputs[drawn], self.noise, class_inputs.min(), class_inputs.max(), generator)
        sources = pool[drawn]
        label = self.target if self.relabel is None else self.relabel
        return Injection(sources, inputs, torch.full((count,), label, dtype=torch.long))
