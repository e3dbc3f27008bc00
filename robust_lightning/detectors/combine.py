"""Combining detectors: one catches label noise, another triggers; together they cover both."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import NamedTuple

import torch
from torch import Tensor

from robust_lightning.detectors.base import Detection, Detector, Signals, any_needs
from robust_lightning.detectors.dynamics import exclusionary_reclassification

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


class Decision(NamedTuple):
    """A round's verdict: flags and scores per sample, and which detectors flagged each one.

    ``fired`` holds one bit per name of ``names``, in order: bit ``j`` of ``fired[i]`` is set when
    detector ``names[j]`` flagged sample ``i``.
    """

    flags: Tensor
    scores: Tensor
    fired: Tensor
    names: tuple[str, ...]

    def sources(self, ids: Tensor) -> list[str]:
        """The names of the detectors that flagged each of ``ids``, joined by "+".

        >>> Decision(torch.tensor([True]), torch.zeros(1), torch.tensor([0b101]), ("a", "b", "c")).sources(torch.tensor([0]))
        ['a+c']
        """
        codes = self.fired[ids].tolist()
        named = {code: "+".join(n for j, n in enumerate(self.names) if code >> j & 1) for code in set(codes)}
        return [named[code] for code in codes]


def decide(
    signals: Signals, detectors: Mapping[str, Detector], rule: str = "any", held_out: Tensor | None = None
) -> Decision:
    """Run ``detectors`` on ``signals`` and join their flags by ``rule``: tensors in, a :class:`Decision` out.

    With ``held_out`` (samples a model was restarted without), a held-out sample whose label the
    model finds less likely than chance stays flagged whatever the rule
    (:func:`~robust_lightning.detectors.exclusionary_reclassification`, named "reclassification").

    >>> from robust_lightning.detectors import AreaUnderMargin
    >>> signals = Signals(torch.tensor([0, 1]), 2, margins=torch.tensor([0.5, -1.0]))
    >>> decision = decide(signals, {"aum": AreaUnderMargin()})
    >>> decision.flags.tolist(), decision.sources(torch.tensor([1]))
    ([False, True], ['aum'])
    """
    detections = {name: detector(signals) for name, detector in detectors.items()}
    combined = combine(list(detections.values()), rule)
    if held_out is not None:
        reclassified = exclusionary_reclassification(signals.logits, signals.labels, held_out)
        detections["reclassification"] = reclassified
        combined = combined._replace(flags=combined.flags | reclassified.flags)
    bits = torch.stack([d.flags.long() << j for j, d in enumerate(detections.values())]).sum(0)
    return Decision(combined.flags, combined.scores, bits, tuple(detections))
