"""kNN label consistency: a sample whose neighbours in feature space mostly carry another label."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from robust_lightning.detectors.base import Detection, Signals

# Rows of the similarity matrix computed at once: bounds memory to CHUNK x N.
CHUNK = 1024


def knn_label_consistency(
    features: Tensor, labels: Tensor, num_classes: int, k: int = 10, agreement: float | None = None
) -> Detection:
    """Flag samples whose label is not the plurality label of their ``k`` nearest neighbours (cosine),
    or, with ``agreement``, whose label fewer than that share of the neighbours carry.

    The score is the share of neighbours that carry another label.

    >>> x = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.95, 0.0], [0.0, 1.0], [0.1, 0.9]])
    >>> knn_label_consistency(x, torch.tensor([0, 0, 1, 1, 1]), 2, k=2).flags.tolist()
    [False, False, True, False, False]
    """
    if not 1 <= k < len(labels):
        raise ValueError(f"k must lie in [1, {len(labels) - 1}] for {len(labels)} samples, got {k!r}.")
    unit = F.normalize(features.float(), dim=1)
    scores = torch.empty(len(labels))
    flags = torch.empty(len(labels), dtype=torch.bool)
    for start in range(0, len(labels), CHUNK):
        rows = torch.arange(start, min(start + CHUNK, len(labels)))
        similarity = unit[rows] @ unit.T
        similarity[torch.arange(len(rows)), rows] = float("-inf")  # not its own neighbour
        votes = F.one_hot(labels[similarity.topk(k, dim=1).indices], num_classes).sum(1)
        own = votes.gather(1, labels[rows, None]).squeeze(1)
        scores[rows] = (1 - own / k).cpu()
        if agreement is None:
            flags[rows] = ((votes.argmax(1) != labels[rows]) & (votes.amax(1) > own)).cpu()
        else:
            flags[rows] = (own < agreement * k).cpu()
    return Detection(scores, flags)


class KNNLabelConsistency:
    """kNN label consistency (Peri et al., "Deep k-NN Defense against Clean-label Data Poisoning
    Attacks", ECCV Workshops 2020): flag a sample whose label loses the vote of its neighbours.

    The paper sets k relative to the class size and flags a label that loses the plurality vote
    (``agreement=None``; a tie keeps the label). The defaults here, k = 10 and ``agreement=0.2``
    (flag a label that fewer than 2 of 10 neighbours share), hold one value for every dataset and
    leave alone the samples of two classes that overlap, where the plurality rule flags clean ones.

    Args:
        k: neighbours consulted.
        agreement: flag when fewer than this share of the neighbours carry the label, in (0, 1];
            None for the paper's plurality rule.

    Example:
        >>> from robust_lightning.detectors import Signals
        >>> x = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.95, 0.0], [0.0, 1.0], [0.1, 0.9]])
        >>> KNNLabelConsistency(k=2, agreement=None)(Signals(torch.tensor([0, 0, 1, 1, 1]), 2, features=x)).flags.tolist()
        [False, False, True, False, False]
    """

    name = "knn"

    def __init__(self, k: int = 10, agreement: float | None = 0.2) -> None:
        if isinstance(k, bool) or int(k) != k or k < 1:
            raise ValueError(f"k must be a positive integer, got {k!r}.")
        if agreement is not None and not 0 < agreement <= 1:
            raise ValueError(f"agreement must lie in (0, 1] or be None, got {agreement!r}.")
        self.k, self.agreement = int(k), agreement

    def __call__(self, signals: Signals) -> Detection:
        signals.need("features", by="KNNLabelConsistency")
        return knn_label_consistency(signals.features, signals.labels, signals.num_classes, self.k, self.agreement)


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
    unit, trusted = F.normalize(features.float(), dim=1), F.normalize(reference.float(), dim=1)
    shares = torch.empty(len(labels))
    for start in range(0, len(labels), CHUNK):
        rows = slice(start, start + CHUNK)
        neighbours = reference_labels[(unit[rows] @ trusted.T).topk(k, dim=1).indices]
        shares[rows] = (neighbours == labels[rows, None]).float().mean(1).cpu()
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
        if isinstance(k, bool) or int(k) != k or k < 1:
            raise ValueError(f"k must be a positive integer, got {k!r}.")
        self.k = int(k)

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
