"""What every poisoning drill shares: a validated rate, a seed and a ground-truth mask."""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from fractions import Fraction
from typing import NamedTuple

import torch
from torch import Tensor, nn


def device_of(model: object) -> torch.device:
    """Where ``model``'s parameters live; the CPU for a function or a module without parameters."""
    parameters = model.parameters() if isinstance(model, nn.Module) else iter(())
    return next(parameters, torch.empty(0)).device


@contextmanager
def evaluating(model: object) -> Iterator[torch.device]:
    """``model`` in eval mode (a module's mode is restored after), under no_grad; yields its device."""
    training = isinstance(model, nn.Module) and model.training
    if isinstance(model, nn.Module):
        model.eval()
    try:
        with torch.no_grad():
            yield device_of(model)
    finally:
        if training:
            model.train()


class PoisonResult(NamedTuple):
    """Poisoned labels and the boolean mask of the samples a drill changed."""

    labels: Tensor
    mask: Tensor


def check_rate(rate: float) -> float:
    if not isinstance(rate, (int, float)) or isinstance(rate, bool) or not 0.0 <= rate < 1.0:
        raise ValueError(f"A poison rate must lie in [0, 1), got {rate!r}. Use e.g. rate=0.4 for 40%.")
    return float(rate)


def count_for(rate: float, n: int) -> int:
    """``round(rate * n)`` with halves rounded up, computed on the rate as written.

    Exact arithmetic, because in floats 0.29 * 50 is 14.4999... and would round down.

    >>> count_for(0.29, 50), count_for(0.4, 145), count_for(0.5, 3)
    (15, 58, 2)
    """
    return math.floor(Fraction(str(rate)) * n + Fraction(1, 2))


def check_labels(labels: Tensor, num_classes: int) -> Tensor:
    labels = torch.as_tensor(labels)
    if labels.ndim != 1 or labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise ValueError(f"Labels must be a 1-D integer tensor, got shape {tuple(labels.shape)} and {labels.dtype}.")
    outside = ((labels < 0) | (labels >= num_classes)).nonzero().flatten()
    if len(outside):
        raise ValueError(f"Labels of ids {outside[:10].tolist()} lie outside [0, {num_classes}).")
    return labels.long()


def drill_repr(drill: object) -> str:
    """``Name(field=value, ...)`` of a drill's public settings, as logged in the data summary."""
    fields = ", ".join(f"{k}={v!r}" for k, v in vars(drill).items() if not k.startswith("_"))
    return f"{type(drill).__name__}({fields})"


class LabelPoison(ABC):
    """A drill that changes labels only. Subclasses implement :meth:`select`.

    Calling a drill never modifies its input and gives the same result for the same seed.
    """

    def __init__(self, rate: float, seed: int = 0) -> None:
        self.rate = check_rate(rate)
        self.seed = int(seed)

    def __call__(self, labels: Tensor, num_classes: int) -> PoisonResult:
        labels = check_labels(labels, num_classes)
        generator = torch.Generator().manual_seed(self.seed)
        poisoned = self.select(labels, num_classes, generator)
        return PoisonResult(poisoned, poisoned != labels)

    @abstractmethod
    def select(self, labels: Tensor, num_classes: int, generator: torch.Generator) -> Tensor:
        """Return new labels for ``labels``; a changed entry must change class."""

    def __repr__(self) -> str:
        return drill_repr(self)


class InputPoison(LabelPoison):
    """A drill that changes the inputs of the samples it chooses, and possibly their labels.

    Subclasses implement :meth:`choose` (the ground-truth mask), :meth:`poison_input` and, where
    labels change, :meth:`new_label`. :meth:`prepare` sees the training inputs first, for drills
    that depend on the data (a class mean, say).
    """

    def __call__(self, labels: Tensor, num_classes: int) -> PoisonResult:
        labels = check_labels(labels, num_classes)
        mask = self.choose(labels, num_classes, torch.Generator().manual_seed(self.seed))
        poisoned = labels.clone()
        poisoned[mask] = self.new_label(labels[mask])
        return PoisonResult(poisoned, mask)

    def select(self, labels: Tensor, num_classes: int, generator: torch.Generator) -> Tensor:
        return self(labels, num_classes).labels

    @abstractmethod
    def choose(self, labels: Tensor, num_classes: int, generator: torch.Generator) -> Tensor:
        """The boolean mask of the samples to poison."""

    @abstractmethod
    def poison_input(self, x: Tensor) -> Tensor:
        """The poisoned version of one sample's input; ``x`` itself is left unchanged."""

    def new_label(self, labels: Tensor) -> Tensor:
        return labels

    def prepare(self, read_inputs: Callable[[Tensor], Tensor], labels: Tensor) -> None:
        """Look at the training inputs before poisoning: ``read_inputs(ids)`` stacks those samples' inputs."""


class Injection(NamedTuple):
    """Samples a drill adds: the id each copies its other entries from, its input and its label."""

    sources: Tensor
    inputs: Tensor
    labels: Tensor


class InjectionPoison(ABC):
    """A drill that adds samples to the training set, made from existing ones.

    Subclasses implement :meth:`inject`. The added samples come after the original ones, so
    their ids are ``n, n + 1, ...``; the ground-truth mask marks exactly them.
    """

    def __init__(self, fraction: float, seed: int = 0) -> None:
        if not isinstance(fraction, (int, float)) or isinstance(fraction, bool) or not 0.0 < fraction <= 1.0:
            raise ValueError(f"fraction (of the training set to add) must lie in (0, 1], got {fraction!r}.")
        self.fraction, self.seed = float(fraction), int(seed)

    @abstractmethod
    def inject(self, read_inputs: Callable[[Tensor], Tensor], labels: Tensor, num_classes: int) -> Injection:
        """The samples to add, given ``read_inputs(ids)`` (the stacked inputs of those ids) and the labels."""

    def __repr__(self) -> str:
        return drill_repr(self)
