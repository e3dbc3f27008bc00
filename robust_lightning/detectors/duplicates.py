"""Near-duplicates: samples that copy an earlier sample up to a small perturbation."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from robust_lightning.detectors.base import Detection, Signals, chunks

# Samples per leaf of the random-projection trees that candidate pairs are compared in, at most: a tree costs
# about N x LEAF x D, plus N x D per level of the tree to build.
LEAF = 2048
# Trees, each split along other random directions: a close pair is missed only when every tree separates it.
TREES = 2
# Leaves per node at the last, multi-way split of a tree.
FANOUT = 8


def near_duplicates(x: Tensor, ratio: float = 0.4) -> Detection:
    """Flag each sample whose nearest *earlier* sample (lower id) is closer than ``ratio`` times
    the median nearest-neighbour distance of the set.

    The score is that median over the distance to the nearest earlier sample (infinite for an
    exact copy). The first of a group of near-copies is kept: data gathered first, and the
    samples an injection drill appends, come after what they copy.

    Up to 2,048 samples the search is exact. Beyond, each of two random-projection trees (Dasgupta
    & Freund, "Random projection trees and low dimensional manifolds", STOC 2008) splits the
    samples at the median of a seeded random direction, level by level, then by rank into leaves
    of 1,024 to 2,048, and each sample is compared exactly with the others of its leaf:
    O(N log N) in all. A
    near-copy is missed only when both trees split it from its original, which a pair far closer
    than its neighbours rarely is. Written here rather than with faiss: its inverted-file index
    needs a centre per few hundred samples, so finding each sample's cell grows as N^2, and its
    search compares one query at a time, where a leaf here is one matrix product.

    >>> x = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [1.0, 0.01], [2.0, 2.0]])
    >>> near_duplicates(x).flags.tolist()
    [False, False, False, True, False]
    """
    if not 0 < ratio < 1:
        raise ValueError(f"ratio must lie in (0, 1), got {ratio!r}.")
    x = x.flatten(1)
    nearest, earlier = _nearest_and_earlier(x)
    # Over distinct neighbours: with many exact copies the plain median would be 0 and flag nothing.
    distinct = nearest[nearest > 0]
    scale = distinct.median() if len(distinct) else torch.tensor(1.0)
    scores = scale / earlier.clamp_min(1e-12)
    return Detection(scores, (earlier < ratio * scale) | (earlier == 0))


def _nearest_and_earlier(x: Tensor) -> tuple[Tensor, Tensor]:
    """Each sample's distance to its nearest other sample and to its nearest earlier one, among its leaves."""
    n = len(x)
    nearest = torch.full((n,), float("inf"), device=x.device)
    earlier = torch.full((n,), float("inf"), device=x.device)
    for seed in range(TREES if n > LEAF else 1):
        leaf = _leaves(x, seed)
        members = leaf.argsort(stable=True)  # ids grouped by leaf
        ends = torch.bincount(leaf).cumsum(0).tolist()
        for start, end in zip([0, *ends[:-1]], ends):
            inside = members[start:end]
            for rows in chunks(len(inside), len(inside)):
                _compare(x, inside[rows], inside, nearest, earlier)
    return nearest.cpu(), earlier.cpu()


def _leaves(x: Tensor, seed: int) -> Tensor:
    """The leaf of each row in a random-projection tree of leaves of 1,024 to 2,048 rows.

    Each level halves every node at its median along a new direction, until a node holds at most
    ``FANOUT`` leaves; a last split cuts each node by rank into leaves of at most ``LEAF``. Halving
    alone would leave leaves between LEAF / 2 and LEAF by where N falls between two powers of
    two (1,562 rows at N = 100k, 1,953 at 1M), and the comparisons, which cost N x leaf x D,
    would grow faster than N.
    """
    n = len(x)
    generator = torch.Generator().manual_seed(seed)
    leaf = torch.zeros(n, dtype=torch.long, device=x.device)
    halvings = max(0, math.ceil(math.log2(n / (FANOUT * LEAF))))
    for _ in range(halvings):
        leaf = _split(x, leaf, 2, generator)
    return _split(x, leaf, math.ceil(math.ceil(n / 2**halvings) / LEAF), generator)


def _split(x: Tensor, node: Tensor, parts: int, generator: torch.Generator) -> Tensor:
    """Cut each node into ``parts`` of equal size by rank along one random direction."""
    n = len(x)
    direction = torch.randn(x.shape[1], generator=generator).to(x.device)
    projection = torch.cat([x[rows].float() @ direction for rows in chunks(n, x.shape[1])])
    # One sort by (node, projection): the projection shifted into [0, span] and the node an integer above it.
    projection = (projection - projection.min()).double()
    order = (node * (float(projection.max()) + 1.0) + projection).argsort()
    counts = torch.bincount(node)
    starts = counts.cumsum(0) - counts
    rank = torch.empty_like(node)
    rank[order] = torch.arange(n, device=x.device) - starts[node[order]]
    return parts * node + rank * parts // counts[node]


def _compare(x: Tensor, queries: Tensor, inside: Tensor, nearest: Tensor, earlier: Tensor) -> None:
    """Lower ``nearest`` and ``earlier`` of ``queries`` by their distances to the samples ``inside`` a cell."""
    distances = torch.cdist(x[queries].float(), x[inside].float())
    distances[queries[:, None] == inside[None, :]] = float("inf")  # not its own neighbour
    nearest.scatter_reduce_(0, queries, distances.amin(1), "amin")
    later = inside[None, :] >= queries[:, None]
    earlier.scatter_reduce_(0, queries, distances.masked_fill(later, float("inf")).amin(1), "amin")


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
