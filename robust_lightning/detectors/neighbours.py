"""Nearest-neighbour search for the detectors, linear in the number of queries.

Searches run against a bounded set of rows (seeded anchors, trusted samples, cluster centres),
never all pairs of a training set. On the CPU they go through faiss's exact flat indexes; on an
accelerator through a chunked matrix product on the device, where that is already fast.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from robust_lightning.detectors.base import chunks

# Training samples a sample's neighbours are drawn from at most: the cost of a kNN round is N x ANCHORS x D.
ANCHORS = 10_000
# Queries per faiss call: faiss bounds its own distance blocks, and on 2 cores 8,192 ran about 20% faster than 32,768.
FAISS_QUERIES = 8192


def nearest_ids(queries: Tensor, base: Tensor, k: int, cosine: bool = False) -> Tensor:
    """Row positions in ``base`` of each query's ``k`` nearest rows, nearest first, ``(len(queries), k)``.

    Euclidean distance, or cosine similarity with ``cosine=True``. Exact: faiss's flat index on
    the CPU (about twice as fast there as a matrix product and ``topk``), a chunked matrix
    product on other devices.

    >>> nearest_ids(torch.tensor([[0.0, 0.0], [5.0, 5.0]]), torch.tensor([[4.0, 4.0], [1.0, 0.0]]), 1).tolist()
    [[1], [0]]
    """
    base = _prepared(base, cosine)
    search = _faiss_search if queries.device.type == "cpu" else _torch_search
    return search(queries, base, k, cosine)


def _prepared(rows: Tensor, cosine: bool) -> Tensor:
    rows = rows.flatten(1).float()
    return F.normalize(rows, dim=1) if cosine else rows


def _faiss_search(queries: Tensor, base: Tensor, k: int, cosine: bool) -> Tensor:
    import faiss  # imported here: only CPU searches need it

    index = faiss.IndexFlatIP(base.shape[1]) if cosine else faiss.IndexFlatL2(base.shape[1])
    index.add(base.contiguous().numpy())
    found = torch.empty(len(queries), k, dtype=torch.long)
    for start in range(0, len(queries), FAISS_QUERIES):
        rows = slice(start, start + FAISS_QUERIES)
        found[rows] = torch.from_numpy(index.search(_prepared(queries[rows], cosine).contiguous().numpy(), k)[1])
    return found


def _torch_search(queries: Tensor, base: Tensor, k: int, cosine: bool) -> Tensor:
    found = torch.empty(len(queries), k, dtype=torch.long, device=queries.device)
    for rows in chunks(len(queries), len(base)):
        part = _prepared(queries[rows], cosine)
        found[rows] = (part @ base.T if cosine else -torch.cdist(part, base)).topk(k, dim=1).indices
    return found


def anchor_ids(n: int, count: int = ANCHORS, seed: int = 0) -> Tensor:
    """All of ``0 .. n-1`` when ``n <= count``, else ``count`` of them drawn with a fixed seed, sorted.

    The same on every call and every DDP rank, so that decisions drawn from them agree.

    >>> anchor_ids(5).tolist(), len(anchor_ids(100, 10))
    ([0, 1, 2, 3, 4], 10)
    """
    if n <= count:
        return torch.arange(n)
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:count].sort().values


def neighbours_among_anchors(rows: Tensor, k: int, cosine: bool = True, count: int = ANCHORS) -> Tensor:
    """Ids of each row's ``k`` nearest other rows among the anchors (:func:`anchor_ids`), ``(N, k)``.

    Exact kNN when there are no more rows than ``count``; beyond that, the neighbours come from a
    seeded sample of ``count`` rows, so the cost grows as N, not N^2. A row never counts as its
    own neighbour.

    >>> neighbours_among_anchors(torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0]]), 1).flatten().tolist()
    [1, 0, 1]
    """
    pool = anchor_ids(len(rows), count).to(rows.device)
    found = pool[nearest_ids(rows, rows[pool], min(k + 1, len(pool)), cosine).to(rows.device)]
    own = found == torch.arange(len(rows), device=rows.device)[:, None]
    return found.gather(1, own.int().argsort(dim=1, stable=True))[:, :k]  # itself moved last, then dropped
