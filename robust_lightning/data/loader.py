"""Wrap the user's train split so that each sample carries its id, out of the user's sight."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import (
    BatchSampler,
    DataLoader,
    Dataset,
    IterableDataset,
    RandomSampler,
    Sampler,
    SequentialSampler,
)

from robust_lightning.data.fields import Key, get_field, replace_field


class IdBatch(NamedTuple):
    """A collated user batch and the ids of its samples. Stripped before the batch reaches the module."""

    batch: Any
    ids: Tensor


class IndexedDataset(Dataset):
    """Return ``(sample, id)``, with the label (and, for input drills, the input) replaced where a drill poisoned it.

    Samples an injection drill added follow the base dataset's: id ``len(base) + k`` is a copy of
    ``base[sources[k]]`` with its input replaced by ``inputs[k]`` (under ``input_key``).
    """

    def __init__(
        self,
        base: Dataset,
        target_key: Key,
        labels: Tensor | None = None,
        poisoned: Tensor | None = None,
        poison_input: tuple[Key, Callable[[Tensor], Tensor]] | None = None,
        injected: tuple[Key, Tensor, Tensor] | None = None,
    ):
        self.base, self.target_key, self.labels, self.poisoned = base, target_key, labels, poisoned
        self.poison_input, self.injected = poison_input, injected

    @property
    def num_base(self) -> int:
        return len(self.base)  # type: ignore[arg-type]

    def __len__(self) -> int:
        return self.num_base + (len(self.injected[1]) if self.injected is not None else 0)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        if index >= self.num_base:
            input_key, sources, inputs = self.injected
            added = index - self.num_base
            sample = replace_field(self.base[int(sources[added])], input_key, inputs[added])
        else:
            sample = self.base[index]
        if self.poisoned is not None and self.poisoned[index]:
            label = relabel(get_field(sample, self.target_key), int(self.labels[index]))
            sample = replace_field(sample, self.target_key, label)
            if self.poison_input is not None and index < self.num_base:
                input_key, stamp = self.poison_input
                sample = replace_field(sample, input_key, stamp(get_field(sample, input_key)))
        return sample, index


def relabel(original: Any, label: int) -> Any:
    """``label`` in the type, dtype and shape of ``original``, so that collate sees no difference.

    >>> relabel(torch.tensor([3]), 5), relabel(np.int64(3), 5), relabel(3, 5), relabel([3], 5)
    (tensor([5]), np.int64(5), 5, [5])
    """
    if isinstance(original, Tensor):
        return torch.full_like(original, label)
    if isinstance(original, np.ndarray):
        return np.full_like(original, label)
    if isinstance(original, np.generic):
        return original.dtype.type(label)
    if isinstance(original, (list, tuple)):  # a label given as [3]
        return type(original)(relabel(item, label) for item in original)
    return type(original)(label)


class IdCollate:
    """Collate with the user's ``collate_fn`` and keep the ids beside the batch.

    A class rather than a closure, so that it pickles into DataLoader worker processes.
    """

    def __init__(self, collate_fn: Callable[[list], Any]) -> None:
        self.collate_fn = collate_fn

    def __call__(self, items: list[tuple[Any, int]]) -> IdBatch:
        return IdBatch(self.collate_fn([sample for sample, _ in items]), torch.tensor([i for _, i in items]))


def loader_shuffles(loader: DataLoader) -> bool:
    """Whether the user's train loader shuffles; refuse what the exclusion sampler cannot reproduce."""
    problem = None
    if type(loader) is not DataLoader:
        problem = f"a {type(loader).__name__} (a DataLoader subclass or another iterable)"
    elif isinstance(loader.dataset, IterableDataset):
        problem = "a loader over an IterableDataset, whose samples have no stable position"
    elif type(loader.batch_sampler) is not BatchSampler:
        problem = f"a custom batch_sampler ({type(loader.batch_sampler).__name__})"
    elif isinstance(loader.sampler, RandomSampler) and (loader.sampler.replacement or loader.sampler._num_samples):
        problem = "a RandomSampler that draws with replacement or a fixed num_samples"
    elif type(loader.sampler) not in (RandomSampler, SequentialSampler):
        problem = f"a custom sampler ({type(loader.sampler).__name__})"
    if problem:
        raise TypeError(
            f"RobustDataModule rebuilds the train DataLoader to attach sample ids and honour exclusions, "
            f"but train_dataloader() returned {problem}. Return a plain torch DataLoader with shuffle=True or "
            "shuffle=False from train_dataloader(); any batch_size, collate_fn and worker settings are kept."
        )
    return isinstance(loader.sampler, RandomSampler)


def rebuild_loader(
    loader: DataLoader, dataset: IndexedDataset, sampler: Sampler, drop_last: bool | None = None
) -> DataLoader:
    """A DataLoader with the user's settings, over ``dataset`` and ``sampler``, collating ids too."""
    return DataLoader(
        dataset,
        batch_size=loader.batch_size,
        sampler=sampler,
        num_workers=loader.num_workers,
        collate_fn=IdCollate(loader.collate_fn),
        pin_memory=loader.pin_memory,
        drop_last=loader.drop_last if drop_last is None else drop_last,
        timeout=loader.timeout,
        worker_init_fn=loader.worker_init_fn,
        multiprocessing_context=loader.multiprocessing_context,
        generator=loader.generator,
        prefetch_factor=loader.prefetch_factor,
        persistent_workers=loader.persistent_workers,
        pin_memory_device=loader.pin_memory_device,
        in_order=loader.in_order,
    )


def as_loader_list(loaders: Any) -> list[Any]:
    """Lightning's evaluation loaders (None, one loader, a list or a dict of them) as a list.

    >>> as_loader_list(None), as_loader_list("a"), as_loader_list(["a", "b"]), as_loader_list({"x": "a"})
    ([], ['a'], ['a', 'b'], ['a'])
    """
    if loaders is None:
        return []
    if isinstance(loaders, Mapping):
        return list(loaders.values())
    return list(loaders) if isinstance(loaders, (list, tuple)) else [loaders]
