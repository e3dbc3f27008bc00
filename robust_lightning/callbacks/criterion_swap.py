"""Reweight each sample's term of a LightningModule's loss for a run, and undo it afterwards."""

from __future__ import annotations

from collections.abc import Callable

import torch
from lightning.pytorch import LightningModule
from torch import Tensor, nn


def mean_denominators(loss: nn.Module, target: Tensor, terms: Tensor) -> Tensor:
    """What each term counts for in the loss's own mean: its class weight, 0 where ignored, else 1.

    Mirrors how ``CrossEntropyLoss`` and ``NLLLoss`` average over class indices, so that unit
    sample weights give back exactly the loss as the module computes it.
    """
    if target.dtype.is_floating_point:  # probabilities: torch averages over the samples
        return terms.new_ones(terms.shape)
    class_weight, ignore = getattr(loss, "weight", None), getattr(loss, "ignore_index", None)
    counted = target != ignore if ignore is not None else torch.ones_like(target, dtype=torch.bool)
    if class_weight is None:
        return counted.to(terms.dtype)
    return class_weight[target.clamp_min(0)].to(terms.dtype) * counted


def reweighted(terms: Tensor, weights: Tensor, reduction: str, denominators: Tensor) -> Tensor:
    """The per-element ``terms`` times per-sample ``weights``, reduced as ``reduction`` says."""
    weights = weights.to(terms.device, terms.dtype).view(-1, *[1] * (terms.ndim - 1))
    if reduction == "none":
        return terms * weights
    if reduction == "sum":
        return (terms * weights).sum()
    return (terms * weights).sum() / (denominators * weights).sum().clamp_min(1e-12)


class CriterionSwap:
    """Wrap ``module.<attr>``'s forward so that each sample's term is multiplied by a weight.

    ``weights(batch_size)`` gives the current batch's weights, or None to leave the loss as it is
    (validation, or a batch the weights do not cover). The loss module stays where it is, with
    its buffers and state-dict keys: only its ``forward`` is wrapped, on the instance, and
    :meth:`restore` removes the wrapper. The check runs at construction, so that a module without
    a usable loss attribute fails at setup with the exact line to add.
    """

    def __init__(
        self, module: LightningModule, weights: Callable[[int], Tensor | None], by: str, attr: str = "criterion"
    ) -> None:
        loss = getattr(module, attr, None)
        if not isinstance(loss, nn.Module) or not hasattr(loss, "reduction"):
            found = "has none" if loss is None else f"has a {type(loss).__name__}"
            raise AttributeError(
                f"{by} reweights the loss of each sample, through the module's loss attribute `{attr}`, but "
                f"{type(module).__name__} {found}. Add `self.{attr} = nn.CrossEntropyLoss()` (or another torch loss "
                f"with a `reduction` argument) in __init__ and compute the loss as `self.{attr}(logits, y)` in "
                "training_step."
            )
        self.loss, self.weights = loss, weights

    def apply(self) -> None:
        self._previous = vars(self.loss).get("forward")  # a compiled loss keeps its forward on the instance
        self._own = self.loss.forward
        self._installed = self._forward
        self.loss.forward = self._installed

    def restore(self) -> None:
        if vars(self.loss).get("forward") is not getattr(self, "_installed", None):
            return
        if self._previous is None:
            del self.loss.forward
        else:
            self.loss.forward = self._previous

    def _forward(self, input: Tensor, target: Tensor, *args, **kwargs) -> Tensor:
        weights = self.weights(len(target))
        if weights is None:
            return self._own(input, target, *args, **kwargs)
        reduction = self.loss.reduction
        self.loss.reduction = "none"
        try:
            terms = self._own(input, target, *args, **kwargs)
        finally:
            self.loss.reduction = reduction
        if reduction == "batchmean":  # KLDivLoss: the sum over a sample's elements, averaged over samples
            weights = weights.to(terms.device, terms.dtype)
            return (terms.reshape(len(weights), -1).sum(1) * weights).sum() / weights.sum().clamp_min(1e-12)
        return reweighted(terms, weights, reduction, mean_denominators(self.loss, target, terms))
