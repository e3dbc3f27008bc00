"""What every robust loss shares: argument checks, class weights and the reduction."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

REDUCTIONS = ("mean", "sum", "none")


def check_in_range(name: str, value: float, low: float, high: float, *, low_open: bool = True) -> None:
    """Raise a ValueError naming ``name`` unless ``low < value <= high`` (``low <= value`` if not ``low_open``)."""
    ok = (low < value if low_open else low <= value) and value <= high
    if not ok:
        interval = f"{'(' if low_open else '['}{low}, {high}]"
        raise ValueError(f"{name} must lie in {interval}, got {value!r}.")


def check_num_classes(num_classes: int, weight: Sequence[float] | Tensor | None = None) -> None:
    """At least two classes, and one class weight for each when there are weights."""
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
        raise ValueError(f"num_classes must be an integer of at least 2, got {num_classes!r}.")
    if weight is not None and len(weight) != num_classes:
        raise ValueError(f"weight has {len(weight)} entries for {num_classes} classes; give one per class.")


def check_classification(input: Tensor, target: Tensor) -> None:
    """Logits of shape (batch, classes) and integer class indices of shape (batch,)."""
    if input.ndim != 2:
        raise ValueError(f"Expected logits of shape (batch, classes), got shape {tuple(input.shape)}.")
    if target.shape != input.shape[:1] or target.dtype.is_floating_point or target.dtype == torch.bool:
        raise ValueError(
            f"Expected integer class indices of shape ({input.shape[0]},), got a {target.dtype} tensor of shape "
            f"{tuple(target.shape)}. Pass the labels as class indices (e.g. y.long()), not one-hot."
        )
    # Only on the CPU: on an accelerator this check would wait for the device at every step, and
    # gather() reports a bad index there anyway (RobustDataModule checks every label at setup).
    if target.device.type == "cpu" and len(target) and not 0 <= int(target.min()) <= int(target.max()) < input.shape[1]:
        raise ValueError(f"Labels must lie in [0, {input.shape[1] - 1}], got {target.min()}..{target.max()}.")


def cross_entropy_terms(input: Tensor, target: Tensor) -> Tensor:
    """Per-sample ``-log p_y``."""
    return -input.log_softmax(1).gather(1, target[:, None]).squeeze(1)


def reduce_loss(terms: Tensor, target: Tensor, weight: Tensor | None, reduction: str) -> Tensor:
    """Per-sample ``terms`` times the class weight of each label, reduced like ``nn.CrossEntropyLoss``.

    With class weights, ``mean`` divides by the sum of the weights of the labels in the batch,
    as torch's own losses do, so that weights of one give the plain mean.
    """
    if weight is not None:
        sample_weight = weight.to(terms.dtype)[target]
        terms = terms * sample_weight
    if reduction == "none":
        return terms
    if reduction == "sum":
        return terms.sum()
    return terms.sum() / (sample_weight.sum() if weight is not None else terms.new_tensor(len(terms)))


class RobustLossBase(nn.Module):
    """A classification loss on logits and class indices, with ``weight`` and ``reduction`` as in torch.

    Subclasses implement :meth:`per_sample`, which gets logits of at least float32 (also under
    bfloat16 autocast, where low precision would lose the small probabilities these losses look at).
    """

    def __init__(self, weight: Sequence[float] | Tensor | None = None, reduction: str = "mean") -> None:
        super().__init__()
        if reduction not in REDUCTIONS:
            raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}.")
        if weight is not None:
            weight = torch.as_tensor(weight, dtype=torch.float32)
            if weight.ndim != 1 or not torch.isfinite(weight).all() or (weight < 0).any() or weight.sum() <= 0:
                raise ValueError(f"weight must be one finite, non-negative weight per class, got {weight.tolist()}.")
        self.register_buffer("weight", weight)
        self.reduction = reduction

    def per_sample(self, input: Tensor, target: Tensor) -> Tensor:
        raise NotImplementedError

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        return apply_loss(self.per_sample, input, target, self.weight, self.reduction)


def apply_loss(
    per_sample: Callable[[Tensor, Tensor], Tensor],
    input: Tensor,
    target: Tensor,
    weight: Sequence[float] | Tensor | None = None,
    reduction: str = "mean",
) -> Tensor:
    """Check the arguments, compute ``per_sample(logits, target)`` in float32 and reduce it."""
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}.")
    check_classification(input, target)
    if weight is not None:
        weight = torch.as_tensor(weight, device=input.device)
        if weight.shape != input.shape[1:]:
            raise ValueError(f"weight has {len(weight)} entries but the logits have {input.shape[1]} classes.")
    with torch.autocast(input.device.type, enabled=False):
        input = input.to(torch.promote_types(input.dtype, torch.float32))  # float16/bfloat16 up, float64 kept
        return reduce_loss(per_sample(input, target), target, weight, reduction)
