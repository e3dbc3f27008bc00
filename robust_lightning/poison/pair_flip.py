"""Pair flip: a targeted label-flipping attack between chosen class pairs."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from robust_lightning.poison.base import LabelPoison, check_rate, count_for


def pair_flip(labels: Tensor, pairs: Mapping[int, int], rate: float, generator: torch.Generator) -> Tensor:
    """Functional form of :class:`PairFlip`: return labels with the pairs flipped.

    For each source class, exactly ``round(rate * count)`` of its samples, chosen at random from
    the *original* labels, get the paired label.

    >>> labels = torch.tensor([4, 4, 4, 4, 8, 8, 1])
    >>> pair_flip(labels, {4: 8, 8: 4}, 0.5, torch.Generator().manual_seed(0)).bincount(minlength=9)[[1, 4, 8]]
    tensor([1, 3, 3])
    """
    rate = check_rate(rate)
    flipped = labels.clone()
    for source in sorted(pairs):
        members = (labels == source).nonzero().flatten()
        chosen = members[torch.randperm(len(members), generator=generator)[: count_for(rate, len(members))]]
        flipped[chosen] = pairs[source]
    return flipped


class PairFlip(LabelPoison):
    """Relabel a fraction of each source class as its paired class.

    Args:
        pairs: source class -> label it is flipped to, e.g. ``{4: 8, 8: 4, 6: 9, 9: 6}``.
        rate: fraction of each source class that is flipped, in [0, 1).
        seed: makes the choice of samples reproducible.

    Example:
        >>> import torch
        >>> drill = PairFlip({4: 8, 8: 4}, rate=0.5)
        >>> result = drill(torch.tensor([4, 4, 8, 8, 1, 1]), num_classes=10)
        >>> int(result.mask.sum()), result.labels[result.mask].tolist() != []
        (2, True)
    """

    def __init__(self, pairs: Mapping[int, int], rate: float, seed: int = 0) -> None:
        super().__init__(rate, seed)
        self.pairs = {int(source): int(target) for source, target in dict(pairs).items()}
        if not self.pairs:
            raise ValueError("PairFlip needs at least one pair, e.g. pairs={4: 8, 8: 4}.")
        same = [source for source, target in self.pairs.items() if source == target]
        if same:
            raise ValueError(f"PairFlip pairs must map a class to a different class; {same} map to themselves.")

    def select(self, labels: Tensor, num_classes: int, generator: torch.Generator) -> Tensor:
        outside = sorted({c for c in (*self.pairs, *self.pairs.values()) if not 0 <= c < num_classes})
        if outside:
            raise ValueError(f"PairFlip pairs name classes {outside} outside [0, {num_classes}).")
        return pair_flip(labels, self.pairs, self.rate, generator)
