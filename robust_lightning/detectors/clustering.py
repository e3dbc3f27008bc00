"""Activation clustering: a poisoned class splits into a clean cluster and a poisoned one."""

from __future__ import annotations

import torch
from torch import Tensor

from robust_lightning.detectors.base import Detection, Signals, class_means, principal_directions, project


def two_means(points: Tensor, iterations: int = 50) -> Tensor:
    """Cluster assignments (0 or 1) of 2-means, started from the extremes of the top principal direction.

    Written here rather than taken from scikit-learn so that it runs on the features' device and
    gives the same answer on every DDP rank: no random restarts.

    >>> two_means(torch.tensor([[0.0], [0.1], [5.0], [5.2]])).tolist()
    [0, 0, 1, 1]
    """
    mean = points.mean(0)
    projection = (points - mean) @ principal_directions(points, centre=mean)[0]
    centres = torch.stack([points[projection.argmin()], points[projection.argmax()]])
    assignment = torch.zeros(len(points), dtype=torch.long, device=points.device)
    for _ in range(iterations):
        new = torch.cdist(points, centres).argmin(1)
        if torch.equal(new, assignment) and _ > 0:
            break
        assignment = new
        centres = torch.stack(
            [points[assignment == j].mean(0) if (assignment == j).any() else centres[j] for j in (0, 1)]
        )
    return assignment


def activation_clustering(
    features: Tensor, labels: Tensor, num_classes: int, dims: int = 10, size_threshold: float = 0.35
) -> Detection:
    """Per class: reduce to ``dims`` principal components, split in two with 2-means, and flag the
    smaller cluster when it holds less than ``size_threshold`` of the class.

    The score of a sample is how small its cluster is: ``1 - relative size``.

    >>> g = torch.Generator().manual_seed(0)
    >>> x = torch.cat([torch.randn(80, 6, generator=g), torch.randn(20, 6, generator=g) + 5])
    >>> d = activation_clustering(x, torch.zeros(100, dtype=torch.long), 1)
    >>> int(d.flags[80:].sum()), int(d.flags[:80].sum())
    (20, 0)
    """
    scores = torch.zeros(len(labels))
    flags = torch.zeros(len(labels), dtype=torch.bool)
    for ids, mean in class_means(features, labels, num_classes, min_size=4):
        assignment = two_means(project(features, ids, mean, principal_directions(features, dims, mean, ids))).cpu()
        sizes = torch.bincount(assignment, minlength=2).float() / len(ids)
        scores[ids] = 1 - sizes[assignment]
        smaller = int(sizes.argmin())
        if sizes[smaller] < size_threshold:
            flags[ids[assignment == smaller]] = True
    return Detection(scores, flags)


class ActivationClustering:
    """Activation clustering (Chen et al., "Detecting Backdoor Attacks on Deep Neural Networks by
    Activation Clustering", 2018), with the relative-size analysis.

    Paper defaults: 10 dimensions (the paper uses ICA; principal components here, which need no
    extra dependency and are deterministic), 2 clusters, and a cluster is poisoned when smaller
    than 35% of its class (ART's ``size_threshold``).

    Args:
        dims: components kept before clustering.
        size_threshold: relative size below which the smaller cluster is flagged, in (0, 0.5].

    Example:
        >>> from robust_lightning.detectors import Signals
        >>> g = torch.Generator().manual_seed(0)
        >>> x = torch.cat([torch.randn(80, 6, generator=g), torch.randn(20, 6, generator=g) + 5])
        >>> int(ActivationClustering()(Signals(torch.zeros(100, dtype=torch.long), 1, features=x)).flags.sum())
        20
    """

    name = "activation_clustering"

    def __init__(self, dims: int = 10, size_threshold: float = 0.35) -> None:
        if int(dims) < 1:
            raise ValueError(f"dims must be a positive integer, got {dims!r}.")
        if not 0 < size_threshold <= 0.5:
            raise ValueError(f"size_threshold must lie in (0, 0.5], got {size_threshold!r}.")
        self.dims, self.size_threshold = int(dims), float(size_threshold)

    def __call__(self, signals: Signals) -> Detection:
        signals.need("features", by="ActivationClustering")
        return activation_clustering(
            signals.features, signals.labels, signals.num_classes, self.dims, self.size_threshold
        )
