"""The one wrapper on a LightningModule's loss through which callbacks change it for a run, and undo it."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, Protocol

import torch
from lightning.pytorch import LightningModule
from torch import Tensor, nn

_KEY = "_robust_lightning_swap"


class Compute(Protocol):
    def __call__(self, reduction: str, input: Tensor, target: Tensor, *args: Any, **kwargs: Any) -> Tensor: ...


class Stage(Protocol):
    """Wraps the loss computation: gets the next step of the chain, the reduction the caller wants and the arguments."""

    def __call__(
        self, compute: Compute, reduction: str, input: Tensor, target: Tensor, *args: Any, **kwargs: Any
    ) -> Tensor: ...


def mean_denominators(loss: nn.Module, target: Tensor, terms: Tensor) -> Tensor:
    """What each term counts for in the loss's own mean: its class weight, 0 where ignored, else 1.

    Mirrors how ``CrossEntropyLoss`` and ``NLLLoss`` (and the losses of
    :mod:`robust_lightning.losses`) average over class indices, so that unit sample weights give
    back exactly the loss as the module computes it.
    """
    if target.dtype.is_floating_point:  # probabilities: torch averages over the samples
        return terms.new_ones(terms.shape)
    class_weight, ignore = getattr(loss, "weight", None), getattr(loss, "ignore_index", None)
    counted = target != ignore if ignore is not None else torch.ones_like(target, dtype=torch.bool)
    if class_weight is None:
        return counted.to(terms.dtype)
    # Ignored labels (e.g. 255) may lie outside the weights: index them as class 0, then count them as 0.
    return class_weight[torch.where(counted, target, 0)].to(terms.dtype) * counted


def reweighted(terms: Tensor, weights: Tensor, reduction: str, denominators: Tensor) -> Tensor:
    """The per-element ``terms`` times per-sample ``weights``, reduced as ``reduction`` says."""
    weights = weights.to(terms.device, terms.dtype).view(-1, *[1] * (terms.ndim - 1))
    if reduction == "none":
        return terms * weights
    if reduction == "sum":
        return (terms * weights).sum()
    return (terms * weights).sum() / (denominators * weights).sum().clamp_min(1e-12)


def loss_attribute(module: LightningModule, attr: str, by: str) -> nn.Module:
    """``module.<attr>`` if it is a torch loss with a ``reduction``; else an error with the line to add."""
    loss = getattr(module, attr, None)
    if not isinstance(loss, nn.Module) or not hasattr(loss, "reduction"):
        found = "has none" if loss is None else f"has a {type(loss).__name__}"
        raise AttributeError(
            f"{by} changes the loss through the module's loss attribute `{attr}`, but {type(module).__name__} "
            f"{found}. If your module keeps its loss under another name, pass attr='<that name>' to the callback. "
            f"Add `self.{attr} = nn.CrossEntropyLoss()` (or another torch loss with a `reduction` "
            f"argument) in __init__ and compute the loss as `self.{attr}(logits, y)` in training_step."
        )
    return loss


class CriterionSwap:
    """The single forward wrapper on ``module.<attr>``, shared by every callback that changes the loss.

    A :class:`~robust_lightning.callbacks.RobustLoss` sets a :meth:`replace`-ment loss; other
    callbacks :meth:`add` stages around it (:class:`Reweight` for per-sample weights), so that
    they compose in any order. The module's loss stays where it is, with its buffers and
    state-dict keys: only its ``forward`` is wrapped, on the instance, while anything is
    installed; the caller's ``reduction`` (the module's loss's) is honoured. Get it with
    :meth:`of`, which fails with the exact line to add when the module has no usable loss.

    Example:
        >>> import torch
        >>> from lightning.pytorch import LightningModule
        >>> module = LightningModule()
        >>> module.criterion = torch.nn.CrossEntropyLoss()
        >>> swap = CriterionSwap.of(module, by="example")
        >>> swap.replace(torch.nn.MultiMarginLoss())
        >>> logits, y = torch.tensor([[2.0, 0.0]]), torch.tensor([0])
        >>> module.criterion(logits, y)
        tensor(0.)
        >>> swap.remove(swap.replacement)
        >>> round(module.criterion(logits, y).item(), 4)
        0.1269
    """

    def __init__(self, loss: nn.Module) -> None:
        self.loss = loss
        self.replacement: nn.Module | None = None
        self.stages: list[Stage] = []
        self._installed: Callable[..., Tensor] | None = None

    @classmethod
    def of(cls, module: LightningModule, attr: str = "criterion", by: str = "This callback") -> CriterionSwap:
        """The swap of ``module.<attr>``, the same object for every callback that asks."""
        loss = loss_attribute(module, attr, by)
        if _KEY not in vars(loss):
            vars(loss)[_KEY] = cls(loss)
        return vars(loss)[_KEY]

    @property
    def active(self) -> nn.Module:
        """The loss that computes the terms: the replacement if there is one."""
        return self.loss if self.replacement is None else self.replacement

    def replace(self, loss: nn.Module, by: str = "RobustLoss") -> None:
        if self.replacement is not None and self.replacement is not loss:
            raise RuntimeError(
                f"{by} would replace the loss, which another callback has replaced with a "
                f"{type(self.replacement).__name__} already. Keep one RobustLoss per loss attribute."
            )
        self.replacement = loss
        self._update()

    def add(self, stage: Stage, outermost: bool = False) -> None:
        """Wrap the loss in ``stage``, inside those added before; ``outermost`` wraps them all instead.

        A stage that adds a term over other inputs than the batch's samples goes outermost, so that
        the term is added once: a mixing stage computes the loss of its two label sets through the
        stages inside it. A term per sample of the batch (TRADES') stays inside, where per-sample
        weights reach it.
        """
        if stage not in self.stages:
            self.stages.insert(0 if outermost else len(self.stages), stage)
        self._update()

    def remove(self, item: nn.Module | Stage | None) -> None:
        """Take a replacement or a stage away; the loss's own forward comes back when nothing is left."""
        if item is not None and item is self.replacement:
            self.replacement = None
        elif item in self.stages:
            self.stages.remove(item)
        self._update()

    def _update(self) -> None:
        installed = self._installed is not None and vars(self.loss).get("forward") is self._installed
        wanted = self.replacement is not None or bool(self.stages)
        if wanted and not installed:
            self._previous = vars(self.loss).get("forward")  # a compiled loss keeps its forward on the instance
            self._own = self.loss.forward
            self._installed = self._forward
            self.loss.forward = self._installed
        elif installed and not wanted:
            if self._previous is None:
                del self.loss.forward
            else:
                self.loss.forward = self._previous
        if wanted:
            vars(self.loss)[_KEY] = self
        else:  # nothing of ours stays on the loss, e.g. when the module is saved
            vars(self.loss).pop(_KEY, None)

    def _forward(self, input: Tensor, target: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        compute: Compute = self._compute
        for stage in reversed(self.stages):
            compute = functools.partial(stage, compute)
        return compute(self.loss.reduction, input, target, *args, **kwargs)

    def _compute(self, reduction: str, input: Tensor, target: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        loss = self.active
        if loss is not self.loss and loss.training != self.loss.training:
            loss.train(self.loss.training)  # no submodule of the LightningModule: follow its train/eval mode
        saved, loss.reduction = loss.reduction, reduction
        try:
            return (self._own if loss is self.loss else loss)(input, target, *args, **kwargs)
        finally:
            loss.reduction = saved


class Reweight:
    """A :class:`CriterionSwap` stage that multiplies each sample's term by a weight.

    ``weights(target)`` gives the weights of the current batch, whose targets the loss got, or None
    to leave the loss as it is (validation, or a batch the weights do not cover).
    """

    def __init__(self, swap: CriterionSwap, weights: Callable[[Tensor], Tensor | None]) -> None:
        self.swap, self.weights = swap, weights

    def __call__(self, compute: Compute, reduction: str, input: Tensor, target: Tensor, *args: Any, **kwargs: Any):
        weights = self.weights(target)
        if weights is None:
            return compute(reduction, input, target, *args, **kwargs)
        terms = compute("none", input, target, *args, **kwargs)
        if reduction == "batchmean":  # KLDivLoss: the sum over a sample's elements, averaged over samples
            weights = weights.to(terms.device, terms.dtype)
            return (terms.reshape(len(weights), -1).sum(1) * weights).sum() / weights.sum().clamp_min(1e-12)
        return reweighted(terms, weights, reduction, mean_denominators(self.swap.active, target, terms))
