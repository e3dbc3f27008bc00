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


# Values of one chunk of rows: bounds the working memory of a pass over the signals to about 16 MB.
CHUNK_VALUES = 1 << 22


def chunks(n: int, width: int) -> Iterator[slice]:
    """Row slices of ``0 .. n`` sized so that each chunk of a ``(n, width)`` matrix holds about 4M values."""
    step = max(1, CHUNK_VALUES // max(width, 1))
    return (slice(start, min(start + step, n)) for start in range(0, n, step))


def second_moment(x: Tensor, centre: Tensor | None = None, ids: Tensor | None = None) -> Tensor:
    """``(x - centre)^T (x - centre)`` over the rows ``ids`` (all by default), ``(D, D)`` in float64.

    Streamed over chunks of rows: each chunk is multiplied in float32 on the rows' device and
    summed in float64, so memory stays at one chunk whatever the number of rows.

    >>> second_moment(torch.tensor([[1.0, 0.0], [3.0, 0.0]]), torch.tensor([2.0, 0.0]))
    tensor([[2., 0.],
            [0., 0.]], dtype=torch.float64)
    """
    total = torch.zeros(x.shape[1], x.shape[1], dtype=torch.float64, device=x.device)
    for rows in chunks(len(x) if ids is None else len(ids), x.shape[1]):
        part = (x[rows] if ids is None else x[ids[rows]]).float()
        part = part if centre is None else part - centre
        total += (part.T @ part).double()
    return total


def principal_directions(x: Tensor, count: int = 1, centre: Tensor | None = None, ids: Tensor | None = None) -> Tensor:
    """The top ``count`` right singular vectors of ``x[ids] - centre`` (all rows, uncentred, by default), as rows.

    From the eigenvectors of the ``(D, D)`` second moment (:func:`second_moment`), which costs one
    streamed pass over the rows: linear in their number, with no copy of ``x``. With fewer rows than
    dimensions the ``(N, N)`` Gram matrix is the smaller one, and is used instead.

    >>> x = torch.tensor([[2.0, 0.0], [-2.0, 0.0], [0.0, 1.0], [0.0, -1.0]])
    >>> principal_directions(x).abs()
    tensor([[1., 0.]])
    """
    n = len(x) if ids is None else len(ids)
    count = min(count, n, x.shape[1])
    if n >= x.shape[1]:
        directions = torch.linalg.eigh(second_moment(x, centre, ids))[1][:, -count:].T
    else:  # fewer samples than dimensions: right vectors from the left ones, v = x^T u / |x^T u|
        small = (x if ids is None else x[ids]).double()
        small = small if centre is None else small - centre.double()
        directions = torch.nn.functional.normalize(
            (small.T @ torch.linalg.eigh(small @ small.T)[1][:, -count:]).T, dim=1
        )
    return directions.flip(0).float()


def project(x: Tensor, ids: Tensor, centre: Tensor, basis: Tensor) -> Tensor:
    """``(x[ids] - centre) @ basis.T``, ``(len(ids), len(basis))``, in chunks so that ``x[ids]`` is never copied whole."""
    return torch.cat([(x[ids[rows]].float() - centre) @ basis.T for rows in chunks(len(ids), x.shape[1])])


def by_class(labels: Tensor, num_classes: int) -> list[Tensor]:
    """The ids of each class's samples."""
    return [(labels == cls).nonzero().flatten() for cls in range(num_classes)]


def class_means(features: Tensor, labels: Tensor, num_classes: int, min_size: int) -> Iterator[tuple[Tensor, Tensor]]:
    """Each class with at least ``min_size`` samples: its ids and its mean feature."""
    for ids in by_class(labels, num_classes):
        if len(ids) >= min_size:
            yield (
                ids,
                sum(features[ids[rows]].float().sum(0) for rows in chunks(len(ids), features.shape[1])) / len(ids),
            )


def check_positive(name: str, value: float) -> float:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not value > 0:
        raise ValueError(f"{name} must be a positive number, got {value!r}.")
    return float(value)


def check_int(name: str, value: int, minimum: int = 1) -> int:
    """``value`` as an int, or an error naming ``name`` when it is not an integer >= ``minimum``.

    >>> check_int("k", 10.0)
    10
    """
    if isinstance(value, bool) or not isinstance(value, (int, float)) or int(value) != value or value < minimum:
        wanted = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
        raise ValueError(f"{name} must be {wanted}, got {value!r}.")
    return int(value)


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
