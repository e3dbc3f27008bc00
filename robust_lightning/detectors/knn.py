"""kNN label consistency: a sample whose neighbours in feature space mostly carry another label."""

from __future__ import annotations

import torch
from torch import Tensor

from robust_lightning.detectors.base import Detection, Signals, check_int
from robust_lightning.detectors.neighbours import ANCHORS, nearest_ids, neighbours_among_anchors


def knn_label_consistency(
    features: Tensor,
    labels: Tensor,
    num_classes: int,
    k: int = 10,
    agreement: float | None = None,
    anchors: int = ANCHORS,
) -> Detection:
    """Flag samples whose label is not the plurality label of their ``k`` nearest neighbours (cosine),
    or, with ``agreement``, whose label fewer than that share of the neighbours carry.

    The neighbours are found among at most ``anchors`` samples, drawn with a fixed seed
    (:func:`~robust_lightning.detectors.neighbours.neighbours_among_anchors`): exact kNN up to that
    many samples, and a cost linear in N beyond. The score is the share of neighbours that carry
    another label.

    >>> x = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.95, 0.0], [0.0, 1.0], [0.1, 0.9]])
    >>> knn_label_consistency(x, torch.tensor([0, 0, 1, 1, 1]), 2, k=2).flags.tolist()
    [False, False, True, False, False]
    """
    if not 1 <= k < len(labels):
        raise ValueError(f"k must lie in [1, {len(labels) - 1}] for {len(labels)} samples, got {k!r}.")
    if not k < anchors:
        raise ValueError(f"anchors must exceed k={k}, got {anchors!r}.")
    neighbour_labels = labels[neighbours_among_anchors(features, k, cosine=True, count=anchors).to(labels.device)]
    own = (neighbour_labels == labels[:, None]).sum(1)
    scores = (1 - own / k).float().cpu()
    if agreement is not None:
        return Detection(scores, (own < agreement * k).cpu())
    votes = torch.zeros(len(labels), num_classes, dtype=torch.long, device=labels.device)
    votes.scatter_add_(1, neighbour_labels, torch.ones_like(neighbour_labels))
    return Detection(scores, ((votes.argmax(1) != labels) & (votes.amax(1) > own)).cpu())


class KNNLabelConsistency:
    """kNN label consistency (Peri et al., "Deep k-NN Defense against Clean-label Data Poisoning
    Attacks", ECCV Workshops 2020): flag a sample whose label loses the vote of its neighbours.

    The paper sets k relative to the class size and flags a label that loses the plurality vote
    (``agreement=None``; a tie keeps the label). The defaults here, k = 10 and ``agreement=0.2``
    (flag a label that fewer than 2 of 10 neighbours share), hold one value for every dataset and
    leave alone the samples of two classes that overlap, where the plurality rule flags clean ones.

    Neighbours are searched among at most ``anchors`` training samples, drawn with a fixed seed:
    exact kNN on sets up to that size, and a round linear in N beyond (10,000 anchors keep a
    1M-sample round under a minute on 2 CPU cores, docs/pages/scale.md).

    Args:
        k: neighbours consulted.
        agreement: flag when fewer than this share of the neighbours carry the label, in (0, 1];
            None for the paper's plurality rule.
        anchors: the most training samples that neighbours are searched among; > k.

    Example:
        >>> from robust_lightning.detectors import Signals
        >>> x = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.95, 0.0], [0.0, 1.0], [0.1, 0.9]])
        >>> KNNLabelConsistency(k=2, agreement=None)(Signals(torch.tensor([0, 0, 1, 1, 1]), 2, features=x)).flags.tolist()
        [False, False, True, False, False]
    """

    name = "knn"

    def __init__(self, k: int = 10, agreement: float | None = 0.2, anchors: int = ANCHORS) -> None:
        self.k, self.anchors = check_int("k", k), check_int("anchors", anchors, minimum=k + 1)
        if agreement is not None and not 0 < agreement <= 1:
            raise ValueError(f"agreement must lie in (0, 1] or be None, got {agreement!r}.")
        self.agreement = agreement

    def __call__(self, signals: Signals) -> Detection:
        signals.need("features", by="KNNLabelConsistency")
        return knn_label_consistency(
            signals.features, signals.labels, signals.num_classes, self.k, self.agreement, self.anchors
        )


def reference_knn(
    features: Tensor, labels: Tensor, reference: Tensor, reference_labels: Tensor, num_classes: int, k: int = 1
) -> Detection:
    """Flag samples whose label none of their ``k`` nearest *trusted* samples (cosine) carries.

    The score is the share of those trusted neighbours that carry another label.

    >>> x, ref = torch.tensor([[1.0, 0.0], [0.0, 1.0]]), torch.tensor([[0.9, 0.1], [0.1, 0.9]])
    >>> reference_knn(x, torch.tensor([1, 1]), ref, torch.tensor([0, 1]), 2).flags.tolist()
    [True, False]
    """
    if not 1 <= k <= len(reference_labels):
        raise ValueError(f"k must lie in [1, {len(reference_labels)}] for {len(reference_labels)} trusted samples.")
    neighbours = reference_labels.to(labels.device)[nearest_ids(features, reference, k, cosine=True).to(labels.device)]
    shares = (neighbours == labels[:, None]).float().mean(1).cpu()
    return Detection(1 - shares, shares == 0)


class ReferenceKNN:
    """kNN label consistency against trusted samples: flag a label that none of the ``k`` nearest
    samples of the validation split carries.

    The trusted-neighbour form of Peri et al. (2020): the neighbours cannot be poisoned, so a
    cluster of poisoned samples (a trigger, a flipped group) cannot vouch for itself. It is
    sensitive and loose, the right tool to screen before :class:`~robust_lightning.callbacks.PoisonFilter`
    restarts the model. Default k = 1.

    Args:
        k: trusted neighbours consulted.

    Example:
        >>> from robust_lightning.detectors import Signals
        >>> x, ref = torch.tensor([[1.0, 0.0], [0.0, 1.0]]), torch.tensor([[0.9, 0.1], [0.1, 0.9]])
        >>> signals = Signals(torch.tensor([1, 1]), 2, features=x, reference_features=ref,
        ...                   reference_labels=torch.tensor([0, 1]))
        >>> ReferenceKNN()(signals).flags.tolist()
        [True, False]
    """

    name = "reference_knn"
    needs_reference = True

    def __init__(self, k: int = 1) -> None:
        self.k = check_int("k", k)

    def __call__(self, signals: Signals) -> Detection:
        signals.need("features", "reference_features", "reference_labels", by="ReferenceKNN")
        return reference_knn(
            signals.features,
            signals.labels,
            signals.reference_features,
            signals.reference_labels,
            signals.num_classes,
            self.k,
        )
