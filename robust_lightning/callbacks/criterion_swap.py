"""Swap a LightningModule's loss attribute for a run, and put the original back afterwards."""

from __future__ import annotations

import copy
from collections.abc import Callable

from lightning.pytorch import LightningModule
from torch import Tensor, nn


class WeightedLoss(nn.Module):
    """The module's own loss, with each sample's term multiplied by a weight while training.

    ``weights(batch_size)`` gives the weights of the current batch, or None to leave the loss
    as it is (validation, or a batch the weights do not cover).
    """

    def __init__(self, original: nn.Module, weights: Callable[[int], Tensor | None]) -> None:
        super().__init__()
        self.original = original
        self.unreduced = copy.copy(original)
        self.unreduced.reduction = "none"
        self.weights = weights

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        weights = self.weights(len(target))
        if weights is None:
            return self.original(input, target)
        terms = self.unreduced(input, target)
        weights = weights.to(terms.device, terms.dtype)
        return (terms * weights).sum() / weights.sum().clamp_min(1e-12)


class CriterionSwap:
    """Replace ``module.<attr>`` by a :class:`WeightedLoss` around it; :meth:`restore` undoes it.

    The check runs at construction, so that a module without a usable loss attribute fails at
    setup with the exact line to add.
    """

    def __init__(
        self, module: LightningModule, weights: Callable[[int], Tensor | None], by: str, attr: str = "criterion"
    ) -> None:
        original = getattr(module, attr, None)
        if not isinstance(original, nn.Module) or not hasattr(original, "reduction"):
            found = "has none" if original is None else f"has a {type(original).__name__}"
            raise AttributeError(
                f"{by} reweights the loss of each sample, through the module's loss attribute `{attr}`, but "
                f"{type(module).__name__} {found}. Add `self.{attr} = nn.CrossEntropyLoss()` (or another torch loss "
                f"with a `reduction` argument) in __init__ and compute the loss as `self.{attr}(logits, y)` in "
                "training_step."
            )
        self.module, self.attr, self.original = module, attr, original
        self.replacement = WeightedLoss(original, weights)

    def apply(self) -> None:
        setattr(self.module, self.attr, self.replacement)

    def restore(self) -> None:
        if getattr(self.module, self.attr, None) is self.replacement:
            setattr(self.module, self.attr, self.original)
