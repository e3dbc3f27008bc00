"""Combining detectors: one catches label noise, another triggers; together they cover both."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from robust_lightning.detectors.base import Detection, Detector, Signals, any_needs

RULES = ("any", "majority", "all")


def rank_scores(scores: Tensor) -> Tensor:
    """Scores mapped to their rank in [0, 1], so that detectors on different scales can be averaged.

    >>> rank_scores(torch.tensor([10.0, -1.0, 3.0])).tolist()
    [1.0, 0.0, 0.5]
    """
    ranks = torch.empty(len(scores))
    ranks[scores.argsort(stable=True)] = torch.arange(len(scores), dtype=torch.float)
    return ranks / max(len(scores) - 1, 1)


def combine(detections: Sequence[Detection], rule: str = "any") -> Detection:
    """Flags joined by ``rule`` ("any", "majority" or "all"); the score is the mean rank of the scores.

    >>> a = Detection(torch.tensor([0.9, 0.1]), torch.tensor([True, False]))
    >>> b = Detection(torch.tensor([0.2, 0.8]), torch.tensor([False, True]))
    >>> combine([a, b], "any").flags.tolist(), combine([a, b], "all").flags.tolist()
    ([True, True], [False, False])
    """
    if rule not in RULES:
        raise ValueError(f"rule must be one of {RULES}, got {rule!r}.")
    votes = torch.stack([d.flags for d in detections]).sum(0)
    needed = {"any": 1, "majority": len(detections) // 2 + 1, "all": len(detections)}[rule]
    scores = torch.stack([rank_scores(d.scores) for d in detections]).mean(0)
    return Detection(scores, votes >= needed)


class Ensemble:
    """Several detectors run on the same signals, their flags joined by a rule.

    Args:
        detectors: the detectors to run.
        rule: "any" (union, the default), "majority" or "all" (intersection).

    Example:
        >>> from robust_lightning.detectors import AreaUnderMargin, Signals
        >>> ensemble = Ensemble([AreaUnderMargin(), AreaUnderMargin(threshold=1.0)], rule="all")
        >>> ensemble(Signals(torch.tensor([0, 1]), 2, margins=torch.tensor([0.5, -1.0]))).flags.tolist()
        [False, True]
    """

    name = "ensemble"

    def __init__(self, detectors: Sequence[Detector], rule: str = "any") -> None:
        if not detectors:
            raise ValueError("Ensemble needs at least one detector.")
        if rule not in RULES:
            raise ValueError(f"rule must be one of {RULES}, got {rule!r}.")
        self.detectors, self.rule = list(detectors), rule

    @property
    def needs_reference(self) -> bool:
        return any_needs(self.detectors, "needs_reference")

    @property
    def needs_inputs(self) -> bool:
        return any_needs(self.detectors, "needs_inputs")

    def __call__(self, signals: Signals) -> Detection:
        return combine([detector(signals) for detector in self.detectors], self.rule)
