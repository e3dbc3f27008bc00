"""Training dynamics: mislabelled samples keep a low margin while the model learns the rest."""

from __future__ import annotations

import torch
from torch import Tensor

from robust_lightning.detectors.base import Detection, Signals


def area_under_margin(margins: Tensor, threshold: float = 0.0) -> Detection:
    """Flag samples whose mean margin over training lies below ``threshold``; unseen ones (NaN) are not flagged.

    >>> area_under_margin(torch.tensor([2.0, -0.5, float("nan")])).flags.tolist()
    [False, True, False]
    """
    seen = ~margins.isnan()
    scores = torch.where(seen, -margins, torch.zeros_like(margins))
    return Detection(scores.float(), seen & (margins < threshold))


class AreaUnderMargin:
    """Area under the margin (Pleiss et al., "Identifying Mislabeled Data using the Area Under the
    Margin Ranking", NeurIPS 2020): the mean over training steps of the given label's logit minus
    the largest other logit.

    The paper picks the threshold from deliberately mislabelled "threshold samples", which costs
    an extra training run; the default here is 0, a sample whose given label was on average not
    the model's top answer.

    Args:
        threshold: flag samples whose AUM lies below it.

    Example:
        >>> from robust_lightning.detectors import Signals
        >>> signals = Signals(torch.tensor([0, 1]), 2, margins=torch.tensor([3.0, -1.0]))
        >>> AreaUnderMargin()(signals).flags.tolist()
        [False, True]
    """

    name = "aum"

    def __init__(self, threshold: float = 0.0) -> None:
        self.threshold = float(threshold)

    def __call__(self, signals: Signals) -> Detection:
        signals.need("margins", by="AreaUnderMargin")
        return area_under_margin(signals.margins, self.threshold)


def exclusionary_reclassification(logits: Tensor, labels: Tensor, held_out: Tensor) -> Detection:
    """Flag held-out samples whose label a model trained without them finds less likely than chance.

    The confirmation step of activation clustering (Chen et al., 2018): a model that never saw
    a sample judges its label out of sample. Only ``held_out`` samples are judged; the score is
    ``1 - p(label)``. Chen et al. keep a sample out when the model assigns it to another class;
    here it stays out only while ``p(label) < 1 / classes``, the same rule for two classes and a
    looser one for more. A poisoned label gets next to nothing from a model that never trained
    on it (a flipped digit is another digit; a trigger the model has not learned points nowhere),
    while an atypical digit gets a share of the vote: on the bundled digits this brings back most
    of the clean samples that argmax kept out (docs/pages/filtering.md).

    >>> logits = torch.tensor([[3.0, 0.0, 0.0], [0.0, 3.0, 0.0], [1.0, 0.8, 0.0], [0.0, 3.0, 0.0]])
    >>> held_out = torch.tensor([True, True, True, False])
    >>> exclusionary_reclassification(logits, torch.tensor([1, 1, 1, 0]), held_out).flags.tolist()
    [True, False, False, False]
    """
    given = logits.float().softmax(1).gather(1, labels[:, None]).squeeze(1)
    scores = torch.where(held_out, 1 - given, torch.zeros_like(given))
    return Detection(scores, held_out & (given < 1 / logits.shape[1]))
