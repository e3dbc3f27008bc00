"""BadNets-style data injection: a trigger patch plus a chosen label."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import Dataset

from robust_lightning.data.fields import Key, get_field, replace_field, resolve_key
from robust_lightning.poison.base import InputPoison, check_rate, count_for, evaluating

CORNERS = ("bottom_right", "bottom_left", "top_right", "top_left")


def stamp_trigger(x: Tensor, size: int = 2, location: str | tuple[int, int] = "bottom_right", value: float = 1.0):
    """Return a copy of ``x`` with a ``size`` x ``size`` patch of ``value``.

    Images are ``(..., H, W)`` and get the patch on every channel; a 1-D feature vector gets
    ``size`` consecutive features set (``top_left``/``bottom_left`` the first ones, the other
    corners the last ones, or a ``(start, _)`` tuple).

    >>> stamp_trigger(torch.zeros(1, 3, 3), size=2)[0]
    tensor([[0., 0., 0.],
            [0., 1., 1.],
            [0., 1., 1.]])
    >>> stamp_trigger(torch.zeros(5), size=2, value=0.5)
    tensor([0.0000, 0.0000, 0.0000, 0.5000, 0.5000])
    """
    out = x.clone()
    spatial = out.shape[-2:] if out.ndim >= 2 else out.shape[-1:]
    if any(size > extent for extent in spatial):
        raise ValueError(f"A {size}-wide trigger does not fit an input of shape {tuple(x.shape)}.")
    if isinstance(location, str):
        if location not in CORNERS:
            raise ValueError(f"location must be one of {CORNERS} or a (row, column) tuple, got {location!r}.")
        # (vertical, horizontal) for an image; a vector reads only the horizontal part.
        at_end = [word in ("bottom", "right") for word in location.split("_")[-len(spatial) :]]
        starts = [extent - size if end else 0 for end, extent in zip(at_end, spatial)]
    else:
        starts = [int(start) for start in location[: len(spatial)]]
        if any(not 0 <= start <= extent - size for start, extent in zip(starts, spatial)):
            raise ValueError(f"A {size}-wide trigger at {tuple(location)} leaves an input of shape {tuple(x.shape)}.")
    region = tuple(slice(start, start + size) for start in starts)
    out[(..., *region)] = value
    return out


class BackdoorTrigger(InputPoison):
    """Stamp a trigger on ``round(rate * n)`` training samples of other classes and relabel them ``target``.

    BadNets (Gu et al., 2017). ``rate`` is a fraction of the whole training set, drawn from the
    samples whose label is not ``target``. :meth:`triggered` gives a triggered copy of a test set
    and :meth:`attack_success_rate` measures how often a model then answers ``target``.

    Args:
        target: the label the attacker wants triggered inputs to get.
        rate: fraction of the training set to poison, in [0, 1).
        size: side of the square patch (or number of features for 1-D inputs).
        location: a corner name (``"bottom_right"``...) or a ``(row, column)`` tuple.
        value: the patch's value, in the inputs' own scale.
        seed: makes the choice of samples reproducible.

    Example:
        >>> drill = BackdoorTrigger(target=0, rate=0.5)
        >>> result = drill(torch.tensor([0, 1, 2, 3]), num_classes=4)
        >>> result.labels.tolist(), result.mask.tolist()
        ([0, 0, 2, 0], [False, True, False, True])
        >>> drill.poison_input(torch.zeros(1, 4, 4))[0, -1].tolist()
        [0.0, 0.0, 1.0, 1.0]
    """

    def __init__(
        self,
        target: int,
        rate: float,
        size: int = 2,
        location: str | tuple[int, int] = "bottom_right",
        value: float = 1.0,
        seed: int = 0,
    ) -> None:
        super().__init__(rate, seed)
        if int(size) < 1:
            raise ValueError(f"The trigger size must be a positive integer, got {size!r}.")
        if isinstance(location, str) and location not in CORNERS:
            raise ValueError(f"location must be one of {CORNERS} or a (row, column) tuple, got {location!r}.")
        if not isinstance(location, str) and any(int(v) < 0 for v in location):
            raise ValueError(f"A trigger location must be non-negative, got {tuple(location)}.")
        self.target, self.size, self.location, self.value = int(target), int(size), location, float(value)

    def choose(self, labels: Tensor, num_classes: int, generator: torch.Generator) -> Tensor:
        if not 0 <= self.target < num_classes:
            raise ValueError(f"BackdoorTrigger target {self.target} lies outside [0, {num_classes}).")
        candidates = (labels != self.target).nonzero().flatten()
        count = count_for(check_rate(self.rate), len(labels))
        if count > len(candidates):
            raise ValueError(
                f"rate={self.rate} asks for {count} poisoned samples, but only {len(candidates)} are not of class "
                f"{self.target}. Lower the rate."
            )
        mask = torch.zeros(len(labels), dtype=torch.bool)
        mask[candidates[torch.randperm(len(candidates), generator=generator)[:count]]] = True
        return mask

    def new_label(self, labels: Tensor) -> Tensor:
        return torch.full_like(labels, self.target)

    def poison_input(self, x: Tensor) -> Tensor:
        return stamp_trigger(x, self.size, self.location, self.value)

    def triggered(self, dataset: Dataset, input_key: Key | None = None, target_key: Key | None = None) -> Dataset:
        """The samples of ``dataset`` not of class ``target``, with the trigger, under their true labels."""
        return TriggeredDataset(dataset, self.poison_input, self.target, input_key, target_key)

    def attack_success_rate(self, model: Callable[[Tensor], Tensor], dataset: Dataset, batch_size: int = 256) -> float:
        """Fraction of the triggered non-target samples of ``dataset`` that ``model`` classifies as ``target``."""
        triggered = self.triggered(dataset)
        loader = torch.utils.data.DataLoader(triggered, batch_size=batch_size)
        hits = total = 0
        with evaluating(model) as device:
            for batch in loader:
                x = get_field(batch, triggered.input_key).to(device)
                hits += int((model(x).argmax(1) == self.target).sum())
                total += len(x)
        return hits / max(total, 1)


class TriggeredDataset(Dataset):
    """The non-target samples of a dataset with a trigger stamped on; labels stay the true ones."""

    def __init__(self, base: Dataset, stamp: Callable[[Tensor], Tensor], target: int, input_key, target_key):
        first = base[0]
        self.base, self.stamp = base, stamp
        self.input_key = resolve_key(first, input_key, "input")
        self.target_key = resolve_key(first, target_key, "target")
        self.ids = [i for i in range(len(base)) if int(get_field(base[i], self.target_key)) != target]

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> Any:
        sample = self.base[self.ids[index]]
        return replace_field(sample, self.input_key, self.stamp(torch.as_tensor(get_field(sample, self.input_key))))
