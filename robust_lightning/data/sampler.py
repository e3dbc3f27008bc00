"""A train sampler that skips excluded samples, identically on every DDP rank."""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
from torch import Tensor
from torch.utils.data import Dataset, DistributedSampler


class ExclusionSampler(DistributedSampler):
    """Yield the ids of the samples whose ``excluded`` flag is False, shuffled per epoch.

    Every rank draws the same permutation from ``seed + epoch`` and takes every
    ``num_replicas``-th id from position ``rank``, as :class:`~torch.utils.data.DistributedSampler`
    does; it subclasses it so that Lightning keeps it instead of injecting its own. Pass it a copy
    of the mask that stays fixed while the loader lives: Lightning sizes epochs from its length.

    Example:
        >>> import torch
        >>> sampler = ExclusionSampler(torch.zeros(6), torch.tensor([0, 1, 0, 0, 1, 0], dtype=torch.bool), shuffle=False)
        >>> list(sampler)
        [0, 2, 3, 5]
    """

    def __init__(
        self,
        dataset: Dataset,
        excluded: Tensor,
        shuffle: bool = True,
        seed: int = 0,
        num_replicas: int = 1,
        rank: int = 0,
    ) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed)
        self.excluded = excluded

    def _included(self) -> Tensor:
        included = (~self.excluded).nonzero().flatten()
        if self.shuffle:
            generator = torch.Generator().manual_seed(self.seed + self.epoch)
            included = included[torch.randperm(len(included), generator=generator)]
        return included

    def __len__(self) -> int:
        return math.ceil(int((~self.excluded).sum()) / self.num_replicas)

    def __iter__(self) -> Iterator[int]:
        ids = self._included()
        total = math.ceil(len(ids) / self.num_replicas) * self.num_replicas
        # Pad by repeating ids, as DistributedSampler does, so all ranks run the same number of steps.
        ids = ids.repeat(math.ceil(total / len(ids)))[:total]
        return iter(ids[self.rank :: self.num_replicas].tolist())
