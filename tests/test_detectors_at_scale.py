"""The detectors' linear-cost paths (chunks, anchors, cells) against exact computations on small sets."""

import pytest
import torch
from sklearn.neighbors import NearestNeighbors

from robust_lightning.detectors import (
    InputSpectralSignatures,
    LinearProbe,
    NearDuplicates,
    Signals,
    SpectralSignatures,
    activation_clustering,
    base,
    knn_label_consistency,
    near_duplicates,
)
from robust_lightning.detectors.neighbours import _faiss_search, _torch_search, anchor_ids


def clustered(n, dim=16, classes=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, classes, (n,), generator=g)
    x = torch.randn(classes, dim, generator=g)[labels] * 3 + torch.randn(n, dim, generator=g)
    return x, labels, g


def test_faiss_and_the_device_search_find_the_same_neighbours():
    x, _, g = clustered(500)
    base_rows = torch.randn(80, 16, generator=g)
    for cosine in (False, True):
        prepared = torch.nn.functional.normalize(base_rows, dim=1) if cosine else base_rows
        assert torch.equal(_faiss_search(x, prepared, 4, cosine), _torch_search(x, prepared, 4, cosine))


def test_knn_beyond_its_anchors_votes_among_a_seeded_sample_of_them():
    x, labels, g = clustered(900)
    labels[torch.randperm(900, generator=g)[:90]] = 0  # some noise for the vote to find
    pool = anchor_ids(900, 200)
    unit = torch.nn.functional.normalize(x, dim=1).numpy()
    found = NearestNeighbors(n_neighbors=6).fit(unit[pool]).kneighbors(unit, return_distance=False)
    shares = []
    for i, row in enumerate(torch.as_tensor(found)):
        ids = [int(pool[j]) for j in row if int(pool[j]) != i][:5]  # never its own neighbour
        shares.append((labels[ids] == labels[i]).float().mean().item())
    detection = knn_label_consistency(x, labels, 5, k=5, agreement=0.4, anchors=200)
    assert (1 - detection.scores).tolist() == pytest.approx(shares)
    assert detection.flags.tolist() == [share < 0.4 for share in shares]


def exact_earlier(x):
    """Distance of each row to its nearest earlier row, by brute force."""
    distances = torch.cdist(x, x)
    distances[torch.ones_like(distances, dtype=torch.bool).triu()] = float("inf")
    return distances.amin(1)


def test_near_duplicates_searched_in_cells_find_what_exact_search_finds():
    x, _, g = clustered(6000)
    copies = x[:60] + 0.02 * torch.randn(60, 16, generator=g)
    rows = torch.cat([x, copies])
    flags = near_duplicates(rows).flags  # 11 cells of about 550 rows
    nearest = torch.cdist(rows, rows).fill_diagonal_(float("inf")).amin(1)
    expected = exact_earlier(rows) < 0.4 * nearest[nearest > 0].median()
    assert torch.equal(flags, expected) and bool(flags[6000:].all())


def test_results_do_not_depend_on_the_chunk_size(monkeypatch):
    """Every streamed pass (moments, projections, searches) gives what one pass over all rows gives."""
    x, labels, _ = clustered(700)
    ref, ref_labels = x[:100] + 0.1, labels[:100]
    signals = Signals(labels, 5, features=x, inputs=x, reference_features=ref, reference_labels=ref_labels,
                      reference_inputs=ref)  # fmt: skip
    detectors = [LinearProbe(), SpectralSignatures(directions=2), InputSpectralSignatures(z=2), NearDuplicates()]
    whole = [d(signals) for d in detectors] + [activation_clustering(x, labels, 5)]
    monkeypatch.setattr(base, "CHUNK_VALUES", 37)  # chunks of 2 rows, the last one shorter
    chunked = [d(signals) for d in detectors] + [activation_clustering(x, labels, 5)]
    for a, b in zip(whole, chunked):
        assert torch.equal(a.flags, b.flags)
        assert torch.allclose(a.scores, b.scores, rtol=1e-4, atol=1e-4)
