"""Losses that keep state per training sample, keyed by the sample ids RobustDataModule hands out."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple, Protocol

import torch
import torch.distributed as dist
from torch import Tensor

from robust_lightning.losses.base import RobustLossBase, apply_loss


class SampleSource(Protocol):
    """Where a per-sample loss learns which samples it is looking at (RobustDataModule is one)."""

    batch_ids: Tensor | None  # ids of the training batch now being trained on
    num_train: int  # ids run from 0 to num_train - 1
    current_epoch: int


class Mixing(NamedTuple):
    """How the current batch was mixed (by Mixup or CutMix), for losses whose per-sample state must know.

    Sample ``i`` of the batch holds a ``lam`` share of its own input and the rest of sample
    ``permutation[i]``'s; ``clean_logits`` are the model's outputs on the unmixed batch.
    """

    lam: float
    permutation: Tensor
    clean_logits: Tensor | None


class PerSampleLoss(RobustLossBase):
    """A loss with one row of state per training sample, in buffers named in :attr:`per_sample_buffers`.

    In training mode it needs the ids of the batch's samples: ``loss(logits, y, ids=ids)``, or
    from a bound :class:`SampleSource` (RobustDataModule binds the losses of the module it trains,
    and :class:`~robust_lightning.callbacks.RobustLoss` the loss it installs). In eval mode the
    state is neither read nor changed. Under torch.distributed, every rank applies the rows that
    all ranks computed in a step, so the buffers stay identical across ranks.
    """

    per_sample_buffers: tuple[str, ...] = ()
    # Whether a mixing callback must hand it the unmixed batch's logits (see :class:`Mixing`).
    uses_clean_logits = False

    def __init__(self, weight: Sequence[float] | Tensor | None = None, reduction: str = "mean") -> None:
        super().__init__(weight, reduction)
        self.source: SampleSource | None = None
        self.mixing: Mixing | None = None

    @property
    def needs_ids(self) -> bool:
        return True

    def bind(self, source: SampleSource) -> None:
        """Take ids from ``source`` and size the per-sample buffers for its training set."""
        self.source = source
        if self.needs_ids:
            self.resize(source.num_train)

    def resize(self, num_samples: int) -> None:
        """Start every per-sample buffer afresh for ``num_samples`` samples, unless it has that size already."""
        for name in self.per_sample_buffers:
            buffer = getattr(self, name)
            if len(buffer) != num_samples:
                setattr(self, name, buffer.new_zeros(num_samples, *buffer.shape[1:]))

    def forward(self, input: Tensor, target: Tensor, ids: Tensor | None = None) -> Tensor:
        if not self.training or not self.needs_ids:
            return apply_loss(self.per_sample, input, target, self.weight, self.reduction)
        ids = self._ids(ids, len(target)).to(input.device)
        return apply_loss(lambda x, y: self.per_sample_with_ids(x, y, ids), input, target, self.weight, self.reduction)

    def per_sample_with_ids(self, input: Tensor, target: Tensor, ids: Tensor) -> Tensor:
        raise NotImplementedError

    def write_rows(self, name: str, ids: Tensor, rows: Tensor) -> None:
        """Set buffer ``name``'s rows of ``ids``, and those every other rank computed in this step."""
        buffer = getattr(self, name)
        all_ids, all_rows = gather_rows(ids, rows.detach())
        # in the buffer's dtype: a bf16-true or 64-true module converts its buffers, not these rows
        buffer[all_ids] = all_rows.to(buffer.dtype)

    def _ids(self, ids: Tensor | None, batch_size: int) -> Tensor:
        name = type(self).__name__
        if ids is None and self.source is None:
            raise RuntimeError(
                f"{name} keeps state per training sample and needs the id of each sample in the batch. Train with "
                "robust_lightning.RobustDataModule wrapping your datamodule (it passes the ids), or call "
                f"{name}(...)(logits, target, ids=ids) yourself."
            )
        ids = self.source.batch_ids if ids is None else torch.as_tensor(ids)
        if ids is None or len(ids) != batch_size:
            raise RuntimeError(
                f"{name} got a batch of {batch_size} samples but RobustDataModule's current batch has "
                f"{'no' if ids is None else len(ids)} ids. Compute this loss once per training step, on the logits of "
                "the whole batch, in the order the batch came in."
            )
        if len(ids) and (int(ids.min()) < 0 or int(ids.max()) >= len(getattr(self, self.per_sample_buffers[0]))):
            raise IndexError(
                f"{name} holds {len(getattr(self, self.per_sample_buffers[0]))} samples but got ids up to "
                f"{int(ids.max())}: bind it to the training set (or call resize(num_samples)) first."
            )
        return ids

    def __getstate__(self) -> dict[str, Any]:
        # The source (a RobustDataModule, and through it the trainer) is the run's, not the loss's:
        # a pickled or deep-copied loss leaves it behind and is bound again by the next fit.
        return {**self.__dict__, "source": None, "mixing": None}

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any, **kwargs: Any) -> None:
        for name in self.per_sample_buffers:  # a checkpoint of a bound loss holds one row per sample
            if prefix + name in state_dict:
                self.resize(len(state_dict[prefix + name]))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


def gather_rows(ids: Tensor, rows: Tensor) -> tuple[Tensor, Tensor]:
    """The ids and rows of every rank (this one's when not distributed), for updates all ranks apply alike."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return ids, rows
    world = dist.get_world_size()
    size = torch.tensor([len(ids)], device=rows.device)
    sizes = [torch.zeros_like(size) for _ in range(world)]
    dist.all_gather(sizes, size)
    longest = int(max(sizes))
    padded_ids = torch.full((longest,), -1, dtype=torch.long, device=rows.device)
    padded_ids[: len(ids)] = ids
    padded_rows = rows.new_zeros(longest, *rows.shape[1:])
    padded_rows[: len(rows)] = rows
    all_ids, all_rows = (
        [torch.empty_like(padded_ids) for _ in range(world)],
        [torch.empty_like(padded_rows) for _ in range(world)],
    )
    dist.all_gather(all_ids, padded_ids)
    dist.all_gather(all_rows, padded_rows)
    ids, rows = torch.cat(all_ids), torch.cat(all_rows)
    return _first_per_id(ids[ids >= 0], rows[ids >= 0])


def _first_per_id(ids: Tensor, rows: Tensor) -> tuple[Tensor, Tensor]:
    """One row per id, the first: DistributedSampler's padding repeats ids across ranks, and writing
    two rows to one id leaves an order-dependent result on some devices."""
    unique, inverse = ids.unique(return_inverse=True)
    positions = torch.arange(len(ids), device=ids.device)
    first = torch.full_like(unique, len(ids)).scatter_reduce(0, inverse, positions, "amin")
    return ids[first], rows[first]
