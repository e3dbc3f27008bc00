"""Near-duplicates: samples that copy an earlier sample up to a small perturbation."""

from __future__ import annotations

import torch
from torch import Tensor

from robust_lightning.detectors.base import Detection, Signals

# Rows of the distance matrix computed at once: bounds memory to CHUNK x N.
CHUNK = 1024


def near_duplicates(x: Tensor, ratio: float = 0.4) -> Detection:
    """Flag each sample whose nearest *earlier* sample (lower id) is closer than ``ratio`` times
    the median nearest-neighbour distance of the set.

    The score is that median over the distance to the nearest earlier sample (infinite for an
    exact copy). The first of a group of near-copies is kept: data gathered first, and the
    samples an injection drill appends, come after what they copy.

    Exact search in chunks rather than locality-sensitive hashing: at the sizes met here it is
    fast, and it misses no pair that a hash would split across buckets.

    >>> x = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [1.0, 0.01], [2.0, 2.0]])
    >>> near_duplicates(x).flags.tolist()
    [False, False, False, True, False]
    """
    if not 0 < ratio < 1:
        raise ValueError(f"ratio must lie in (0, 1), got {ratio!r}.")
    x = x.flatten(1).float()
    n = len(x)
    nearest, earlier = torch.empty(n), torch.full((n,), float("inf"))
    for start in range(0, n, CHUNK):
        rows = torch.arange(start, min(start + CHUNK, n))
        distances = torch.cdist(x[rows], x)
        distances[torch.arange(len(rows)), rows] = float("inf")  # not its own neighbour
        nearest[rows] = distances.amin(1).cpu()
        later = torch.arange(n, device=x.device)[None, :] >= rows[:, None].to(x.device)
        earlier[rows] = distances.masked_fill(later, float("inf")).amin(1).cpu()
    # Over distinct neighbours: with many exact copies the plain median would be 0 and flag nothing.
    distinct = nearest[nearest > 0]
    scale = distinct.median() if len(distinct) else torch.tensor(1.0)
    scores = scale / earlier.clamp_min(1e-12)
    return Detection(scores, (earlier < ratio * scale) | (earlier == 0))


class NearDuplicates:
    """Near-duplicate detection on the penultimate features (or any rows): copies up to a small change.

    Injected near-copies of a class's samples (:class:`~robust_lightning.poison.ClassInjection`)
    bias the model toward that class; a copy sits far closer to its original than real samples sit
    to each other. ``near_duplicates`` does the same on raw inputs, before any training.

    Args:
        ratio: flag a sample closer to an earlier one than this share of the median
            nearest-neighbour distance.

    Example:
        >>> features = torch.tensor([[0.0, 0.0], [3.0, 0.0], [0.0, 3.0], [3.0, 3.0], [3.0, 0.2]])
        >>> NearDuplicates()(Signals(torch.zeros(5, dtype=torch.long), 2, features=features)).flags.tolist()
        [False, False, False, False, True]
    """

    name = "near_duplicates"

    def __init__(self, ratio: float = 0.4) -> None:
        near_duplicates(torch.zeros(2, 1), ratio)  # validates ratio
        self.ratio = ratio

    def __call__(self, signals: Signals) -> Detection:
        signals.need("features", by="NearDuplicates")
        return near_duplicates(signals.features, self.ratio)
