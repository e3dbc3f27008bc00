"""Near-duplicates: samples that copy an earlier sample up to a small perturbation."""

from __future__ import annotations

import torch
from torch import Tensor

from robust_lightning.detectors.base import Detection, Signals, chunks
from robust_lightning.detectors.neighbours import anchor_ids, nearest_ids

# Samples per cell of the partition that candidate pairs are searched in: the cost is about N x 2 LIST_SIZE x D,
# plus N x (N / LIST_SIZE) x D to find each sample's cells.
LIST_SIZE = 512
# Lloyd iterations that move the centres of the cells, on a sample of 32 rows per cell: seeded samples alone
# leave some cells (hubs) ten times larger than the mean, which costs twice as much.
CENTRE_ITERATIONS = 3
# Cells each sample looks into, its nearest centres: a pair of close samples lands in one cell
# unless it straddles a border, and looking into the second-nearest cell catches those.
PROBES = 2


def near_duplicates(x: Tensor, ratio: float = 0.4) -> Detection:
    """Flag each sample whose nearest *earlier* sample (lower id) is closer than ``ratio`` times
    the median nearest-neighbour distance of the set.

    The score is that median over the distance to the nearest earlier sample (infinite for an
    exact copy). The first of a group of near-copies is kept: data gathered first, and the
    samples an injection drill appends, come after what they copy.

    Up to 1,023 samples the search is exact. Beyond, the samples are split into cells around
    centres (an inverted file, as in faiss's ``IndexIVFFlat``, with a few seeded k-means steps),
    and each sample is compared
    exactly with the samples of its two nearest cells: linear in N, and a near-copy is missed only
    when it and its original straddle the borders of three cells. Written here rather than with
    faiss's IVF index, whose search compares one query at a time: this compares a cell's queries
    with its members in one matrix product, about ten times faster on the CPU.

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
    """Each sample's distance to its nearest other sample and to its nearest earlier one, among its cells."""
    n = len(x)
    centres = _centres(x, max(1, n // LIST_SIZE))
    cells = nearest_ids(x, centres, min(PROBES, len(centres))).to(x.device)
    home = cells[:, 0]
    members = home.argsort(stable=True)  # ids grouped by cell, in id order within each cell
    bounds = torch.bincount(home, minlength=len(centres)).cumsum(0).tolist()
    probing = cells.flatten().argsort(stable=True) // cells.shape[1]  # the ids that look into each cell, grouped
    probe_bounds = torch.bincount(cells.flatten(), minlength=len(centres)).cumsum(0).tolist()
    nearest = torch.full((n,), float("inf"), device=x.device)
    earlier = torch.full((n,), float("inf"), device=x.device)
    for cell in range(len(centres)):
        inside = members[(bounds[cell - 1] if cell else 0) : bounds[cell]]
        queries = probing[(probe_bounds[cell - 1] if cell else 0) : probe_bounds[cell]]
        for rows in chunks(len(queries), len(inside)):
            _compare(x, queries[rows], inside, nearest, earlier)
    return nearest.cpu(), earlier.cpu()


def _centres(x: Tensor, count: int) -> Tensor:
    """``count`` cell centres: seeded samples moved by a few k-means steps over a seeded sample of the rows."""
    centres = x[anchor_ids(len(x), count).to(x.device)].float()
    sample = x[anchor_ids(len(x), 32 * count, seed=1).to(x.device)].float()
    for _ in range(CENTRE_ITERATIONS if count > 1 else 0):
        home = nearest_ids(sample, centres, 1)[:, 0].to(x.device)
        sums = torch.zeros_like(centres).index_add_(0, home, sample)
        counts = torch.bincount(home, minlength=count)[:, None]
        centres = torch.where(counts > 0, sums / counts.clamp_min(1), centres)  # an empty cell keeps its centre
    return centres


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
