"""What every detector takes and gives: per-sample signals in, suspicion scores and flags out."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any, NamedTuple, Protocol

import torch
from torch import Tensor


class Detection(NamedTuple):
    """A suspicion score per sample (higher is more suspicious) and the boolean flags."""

    scores: Tensor
    flags: Tensor


@dataclass
class Signals:
    """Per-sample signals of a training set, all indexed by sample id.

    Args:
        labels: the labels as trained on, ``(N,)``.
        num_classes: number of classes.
        features: penultimate (or chosen-layer) features, ``(N, D)``.
        logits: the model's outputs, ``(N, C)``.
        margins: mean over training of the given label's logit minus the largest other one, ``(N,)``;
            NaN for a sample never seen.
        reference_features: features of trusted samples (the validation split), ``(M, D)``.
        reference_labels: their labels, ``(M,)``.
        inputs: the inputs, one flattened row per sample, ``(N, P)``.
        reference_inputs: the trusted samples' inputs, ``(M, P)``.
        excluded: the samples excluded from training when the signals were read, ``(N,)`` bool; a
            detector that learns from the labels (:class:`~robust_lightning.detectors.LinearProbe`)
            learns from the others only.
    """

    labels: Tensor
    num_classes: int
    features: Tensor | None = None
    logits: Tensor | None = None
    margins: Tensor | None = None
    reference_features: Tensor | None = None
    reference_labels: Tensor | None = None
    inputs: Tensor | None = None
    reference_inputs: Tensor | None = None
    excluded: Tensor | None = None

    def need(self, *names: str, by: str) -> None:
        missing = [name for name in names if getattr(self, name) is None]
        if missing:
            raise ValueError(f"{by} needs the signals {missing}, which were not collected.")


class Detector(Protocol):
    """Anything that maps :class:`Signals` to a :class:`Detection`."""

    def __call__(self, signals: Signals) -> Detection: ...


def any_needs(detectors: Iterable[Any], flag: str) -> bool:
    """Whether any detector declares ``flag`` (``"needs_reference"``, ``"needs_inputs"``) true.

    >>> any_needs([object()], "needs_inputs")
    False
    """
    return any(getattr(detector, flag, False) for detector in detectors)


def margins_of(logits: Tensor, labels: Tensor) -> Tensor:
    """The given label's logit minus the largest other logit (Pleiss et al., 2020).

    >>> margins_of(torch.tensor([[2.0, 0.5, 1.0], [0.0, 3.0, 1.0]]), torch.tensor([0, 0]))
    tensor([ 1., -3.])
    """
    given = logits.gather(1, labels[:, None]).squeeze(1)
    others = logits.scatter(1, labels[:, None], float("-inf")).amax(1)
    return given - others


def principal_directions(centred: Tensor, count: int = 1) -> Tensor:
    """The top ``count`` right singular vectors of a centred feature matrix, as rows (computed in float64).

    From the eigenvectors of the smaller Gram matrix rather than a full SVD: the detectors need one
    to ten directions, and for a class of a few hundred samples this is about ten times faster.

    >>> x = torch.tensor([[2.0, 0.0], [-2.0, 0.0], [0.0, 1.0], [0.0, -1.0]])
    >>> principal_directions(x).abs()
    tensor([[1., 0.]])
    """
    x = centred.double()
    count = min(count, *x.shape)
    if x.shape[0] >= x.shape[1]:
        directions = torch.linalg.eigh(x.T @ x)[1][:, -count:].T
    else:  # fewer samples than dimensions: right vectors from the left ones, v = x^T u / |x^T u|
        directions = torch.nn.functional.normalize((x.T @ torch.linalg.eigh(x @ x.T)[1][:, -count:]).T, dim=1)
    return directions.flip(0).to(centred.dtype)


def by_class(labels: Tensor, num_classes: int) -> list[Tensor]:
    """The ids of each class's samples."""
    return [(labels == cls).nonzero().flatten() for cls in range(num_classes)]


def centred_classes(
    features: Tensor, labels: Tensor, num_classes: int, min_size: int
) -> Iterator[tuple[Tensor, Tensor]]:
    """Each class with at least ``min_size`` samples: its ids and its features centred on the class mean."""
    for ids in by_class(labels, num_classes):
        if len(ids) >= min_size:
            yield ids, features[ids] - features[ids].mean(0)


def check_positive(name: str, value: float) -> float:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not value > 0:
        raise ValueError(f"{name} must be a positive number, got {value!r}.")
    return float(value)


def no_flags(n: int) -> Detection:
    return Detection(torch.zeros(n), torch.zeros(n, dtype=torch.bool))


def detection_quality(flags: Tensor, truth: Tensor) -> dict[str, float]:
    """Precision, recall and F1 of boolean ``flags`` against the ground-truth mask ``truth``.

    Example:
        >>> import torch
        >>> detection_quality(torch.tensor([True, True, False, False]), torch.tensor([True, False, True, False]))
        {'precision': 0.5, 'recall': 0.5, 'f1': 0.5}
    """
    hits = int((flags & truth).sum())
    precision, recall = hits / max(int(flags.sum()), 1), hits / max(int(truth.sum()), 1)
    return {"precision": precision, "recall": recall, "f1": 2 * precision * recall / max(precision + recall, 1e-12)}
