"""Detectors are pure tensor code: checked here against independent computations."""

import pytest
import torch
from sklearn.neighbors import NearestNeighbors

from robust_lightning import RobustDataModule
from robust_lightning.data import DigitsDataModule
from robust_lightning.detectors import (
    DETECTORS,
    ActivationClustering,
    AreaUnderMargin,
    Detection,
    Ensemble,
    InputSpectralSignatures,
    KNNLabelConsistency,
    LinearProbe,
    Signals,
    SpectralSignatures,
    area_under_margin,
    combine,
    exclusionary_reclassification,
    knn_label_consistency,
    linear_probe,
    margins_of,
    spectral_signatures,
)
from robust_lightning.poison import BackdoorTrigger


def blobs(seed=0, clean=90, odd=10, shift=4.0, dim=8):
    g = torch.Generator().manual_seed(seed)
    return torch.cat([torch.randn(clean, dim, generator=g), torch.randn(odd, dim, generator=g) + shift])


def test_margins_match_a_direct_computation():
    logits = torch.randn(50, 7, generator=torch.Generator().manual_seed(1))
    labels = torch.randint(0, 7, (50,), generator=torch.Generator().manual_seed(2))
    expected = [float(row[y] - max(v for k, v in enumerate(row) if k != y)) for row, y in zip(logits, labels)]
    assert margins_of(logits, labels).tolist() == pytest.approx(expected)


def test_paper_spectral_signatures_flag_one_and_a_half_times_the_expected_fraction_per_class():
    x = torch.cat([blobs(0), blobs(1)])
    labels = torch.cat([torch.zeros(100), torch.ones(100)]).long()
    detection = spectral_signatures(x, labels, 2, expected_fraction=0.1)
    assert detection.flags[:100].sum() == detection.flags[100:].sum() == 15
    assert detection.flags[90:100].all() and detection.flags[190:].all(), "the shifted samples rank first"


def test_reference_spectral_signatures_flag_outliers_of_the_trusted_class_and_spare_clean_data():
    x, reference = blobs(0), blobs(3, clean=30, odd=0)
    labels, ref_labels = torch.zeros(100, dtype=torch.long), torch.zeros(30, dtype=torch.long)
    detection = SpectralSignatures(z=3)(
        Signals(labels, 1, features=x, reference_features=reference, reference_labels=ref_labels)
    )
    assert detection.flags[90:].all() and not detection.flags[:90].any()
    clean = SpectralSignatures(z=3)(
        Signals(labels[:90], 1, features=x[:90], reference_features=reference, reference_labels=ref_labels)
    )
    assert clean.flags.float().mean() <= 0.02


def digits_signals(poison, seed):
    data = RobustDataModule(DigitsDataModule(), poison=poison, seed=seed)
    data.setup("fit")
    inputs = torch.stack([data.training_sample(i)[0] for i in range(data.num_train)]).flatten(1)
    trusted, trusted_labels = data.datamodule.val_set.tensors
    signals = Signals(
        data.train_labels, 10, inputs=inputs, reference_inputs=trusted.flatten(1), reference_labels=trusted_labels
    )
    return signals, data.poison_mask


@pytest.mark.parametrize("seed", [0, 7])
def test_input_spectral_signatures_find_every_stamped_digit_and_no_clean_one(seed):
    signals, mask = digits_signals(BackdoorTrigger(target=0, rate=0.1, seed=seed), seed)
    detection = InputSpectralSignatures()(signals)
    assert torch.equal(detection.flags, mask), "every stamped digit, seed 7's included, whose features pass for a 0"
    clean, _ = digits_signals(None, seed)
    assert not InputSpectralSignatures()(clean).flags.any()


def test_a_class_with_too_few_trusted_samples_is_not_judged():
    x = blobs(0)
    detection = SpectralSignatures()(
        Signals(
            torch.zeros(100, dtype=torch.long),
            1,
            features=x,
            reference_features=x[:2],
            reference_labels=torch.zeros(2).long(),
        )
    )
    assert not detection.flags.any()


def test_activation_clustering_flags_the_small_cluster_only_when_it_is_small():
    labels = torch.zeros(100, dtype=torch.long)
    assert ActivationClustering()(Signals(labels, 1, features=blobs(0, 80, 20))).flags.sum() == 20
    halves = ActivationClustering()(Signals(labels, 1, features=blobs(0, 50, 50)))
    assert not halves.flags.any(), "two equal clusters: the relative-size analysis flags neither"


def test_knn_label_consistency_matches_sklearn_neighbours():
    g = torch.Generator().manual_seed(0)
    x, labels = torch.randn(120, 5, generator=g), torch.randint(0, 3, (120,), generator=g)
    unit = torch.nn.functional.normalize(x, dim=1).numpy()
    neighbours = NearestNeighbors(n_neighbors=6).fit(unit).kneighbors(unit, return_distance=False)[:, 1:]
    shares = [(labels[row] == labels[i]).float().mean().item() for i, row in enumerate(torch.as_tensor(neighbours))]
    detection = knn_label_consistency(x, labels, 3, k=5, agreement=0.4)
    assert (1 - detection.scores).tolist() == pytest.approx(shares)
    assert detection.flags.tolist() == [share < 0.4 for share in shares]


def ridge_fit(x, y, ridge):
    """An independent ridge fit: standardized features, unpenalized bias, solved by least squares."""
    x = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], 1)
    penalty = torch.diag(torch.tensor([ridge**0.5] * (x.shape[1] - 1) + [0.0], dtype=x.dtype))
    stacked = torch.cat([x, penalty]), torch.cat([y, torch.zeros(x.shape[1], y.shape[1], dtype=x.dtype)])
    return torch.linalg.lstsq(*stacked).solution


def test_the_probe_scores_each_sample_by_a_probe_refitted_without_it():
    g = torch.Generator().manual_seed(0)
    x, labels = torch.randn(60, 4, generator=g).double(), torch.randint(0, 3, (60,), generator=g)
    excluded = torch.zeros(60, dtype=torch.bool)
    excluded[50:] = True
    scores = linear_probe(x, labels, 3, excluded, ridge=2.0)
    kept = (~excluded).nonzero().flatten()
    mean, std = x[kept].mean(0), x[kept].std(0)  # the probe standardizes by the samples it learns from
    onehot = torch.nn.functional.one_hot(labels, 3).double()
    for i in (0, 17, 49):
        rest = kept[kept != i]
        weights = ridge_fit((x[rest] - mean) / std, onehot[rest], 2.0)
        expected = torch.cat([(x[i] - mean) / std, torch.ones(1, dtype=x.dtype)]) @ weights
        assert scores[i].tolist() == pytest.approx(expected.tolist(), abs=1e-5)
    weights = ridge_fit((x[kept] - mean) / std, onehot[kept], 2.0)  # excluded samples: the probe on all the kept
    expected = torch.cat([(x[55:56] - mean) / std, torch.ones(1, 1, dtype=x.dtype)], 1) @ weights
    assert scores[55].tolist() == pytest.approx(expected[0].tolist(), abs=1e-5)


def test_the_probe_flags_a_flipped_group_and_learns_nothing_from_excluded_labels():
    x = torch.cat([blobs(0, clean=60, odd=0, dim=4) - 3, blobs(1, clean=60, odd=0, dim=4) + 3])
    labels = torch.cat([torch.zeros(60), torch.ones(60)]).long()
    labels[:20] = 1  # a flipped group: a third of the first class is labelled as the other
    assert LinearProbe()(Signals(labels, 2, features=x)).flags[:20].all()
    excluded = torch.zeros(120, dtype=torch.bool)
    excluded[:20] = True
    flags = LinearProbe()(Signals(labels, 2, features=x, excluded=excluded)).flags
    assert flags[:20].all() and not flags[20:].any(), "the excluded flips neither teach the probe nor escape it"
    relabelled = labels.clone()
    relabelled[:20] = 0  # what the excluded samples say cannot change what the probe learns
    again = linear_probe(x, relabelled, 2, excluded)
    assert torch.allclose(again[20:], linear_probe(x, labels, 2, excluded)[20:])


def test_area_under_margin_flags_negative_means_and_ignores_unseen_samples():
    margins = torch.tensor([1.0, -0.1, float("nan"), 0.0])
    assert area_under_margin(margins).flags.tolist() == [False, True, False, False]
    assert AreaUnderMargin(threshold=0.5)(Signals(torch.zeros(4).long(), 1, margins=margins)).flags.tolist() == [
        False,
        True,
        False,
        True,
    ]


def test_reclassification_keeps_out_labels_below_chance_and_only_held_out_ones():
    g = torch.Generator().manual_seed(0)
    logits, labels = torch.randn(500, 2, generator=g) * 3, torch.randint(0, 2, (500,), generator=g)
    held_out = torch.rand(500, generator=g) < 0.5
    two = exclusionary_reclassification(logits, labels, held_out).flags
    assert torch.equal(two, held_out & (logits.argmax(1) != labels))  # two classes: chance is the argmax rule
    ten = torch.log(torch.tensor([[0.55, 0.3] + [0.15 / 8] * 8, [0.95, 0.05 / 9] + [0.05 / 9] * 8]))
    flags = exclusionary_reclassification(ten, torch.tensor([1, 1]), torch.tensor([True, True])).flags
    assert flags.tolist() == [False, True]  # 0.3 of 10 classes is above chance although not the answer


def test_combine_rules():
    a = Detection(torch.tensor([3.0, 2.0, 1.0]), torch.tensor([True, True, False]))
    b = Detection(torch.tensor([1.0, 2.0, 3.0]), torch.tensor([True, False, False]))
    c = Detection(torch.tensor([0.0, 0.0, 5.0]), torch.tensor([False, False, True]))
    assert combine([a, b, c], "any").flags.tolist() == [True, True, True]
    assert combine([a, b, c], "majority").flags.tolist() == [True, False, False]
    assert combine([a, b, c], "all").flags.tolist() == [False, False, False]
    signals = Signals(torch.zeros(2).long(), 1, margins=torch.tensor([-1.0, 1.0]))
    assert Ensemble([AreaUnderMargin(), AreaUnderMargin(2.0)], "all")(signals).flags.tolist() == [True, False]


def test_every_registered_detector_is_named_after_its_key():
    assert {name: cls.name for name, cls in DETECTORS.items()} == {name: name for name in DETECTORS}


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: SpectralSignatures(z=-1), "z must be a positive"),
        (lambda: SpectralSignatures(expected_fraction=0), "expected_fraction"),
        (lambda: KNNLabelConsistency(k=0), "k must be a positive integer"),
        (lambda: KNNLabelConsistency(agreement=1.5), "agreement"),
        (lambda: LinearProbe(ridge=0), "ridge must be a positive"),
        (lambda: linear_probe(torch.tensor([[float("nan")], [1.0]]), torch.tensor([0, 1]), 2), "NaN or inf"),
        (lambda: linear_probe(torch.eye(3), torch.arange(3), 3, torch.tensor([True, True, False])), "two samples"),
        (lambda: ActivationClustering(size_threshold=0.9), "size_threshold"),
        (lambda: Ensemble([], "any"), "at least one"),
        (lambda: Ensemble([AreaUnderMargin()], "most"), "rule must be one of"),
    ],
)
def test_nonsensical_settings_are_refused(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_a_missing_signal_is_named():
    with pytest.raises(ValueError, match="features"):
        SpectralSignatures()(Signals(torch.zeros(3).long(), 1))
