from decimal import ROUND_HALF_UP, Decimal

import pytest
import torch

from robust_lightning.data import DigitsDataModule
from robust_lightning.poison import PairFlip, SymmetricNoise

PAIRS = {4: 8, 8: 4, 6: 9, 9: 6}


def round_half_up(rate: float, n: int) -> int:
    return int((Decimal(str(rate)) * n).quantize(Decimal(1), rounding=ROUND_HALF_UP))


@pytest.fixture(scope="module")
def digit_labels():
    dm = DigitsDataModule()
    dm.setup("fit")
    return dm.train_set.tensors[1]


def test_pair_flip_flips_exactly_round_rate_times_each_source_class(digit_labels):
    result = PairFlip(PAIRS, rate=0.4, seed=3)(digit_labels, num_classes=10)
    for source, target in PAIRS.items():
        members = digit_labels == source
        flipped = result.mask & members
        assert int(flipped.sum()) == round_half_up(0.4, int(members.sum()))
        assert (result.labels[flipped] == target).all()
    untouched = ~torch.isin(digit_labels, torch.tensor(list(PAIRS)))
    assert not result.mask[untouched].any()
    assert torch.equal(result.mask, result.labels != digit_labels)


def test_symmetric_noise_moves_exactly_round_rate_times_n_each_to_another_class(digit_labels):
    for rate in (0.2, 0.4, 0.6):
        result = SymmetricNoise(rate, seed=1)(digit_labels, num_classes=10)
        assert int(result.mask.sum()) == round_half_up(rate, len(digit_labels))
        assert (result.labels[result.mask] != digit_labels[result.mask]).all()
        assert ((result.labels >= 0) & (result.labels < 10)).all()


def test_symmetric_noise_spreads_over_all_other_classes(digit_labels):
    result = SymmetricNoise(0.6, seed=0)(digit_labels, num_classes=10)
    shifts = (result.labels[result.mask] - digit_labels[result.mask]) % 10
    counts = torch.bincount(shifts, minlength=10)
    assert counts[0] == 0
    assert (counts[1:] > 0.5 * counts[1:].float().mean()).all()


@pytest.mark.parametrize("drill", [PairFlip(PAIRS, 0.4, seed=7), SymmetricNoise(0.4, seed=7)])
def test_drills_are_deterministic_given_a_seed_and_leave_their_input_alone(digit_labels, drill):
    before = digit_labels.clone()
    first, second = drill(digit_labels, 10), drill(digit_labels, 10)
    assert torch.equal(first.labels, second.labels) and torch.equal(first.mask, second.mask)
    assert torch.equal(digit_labels, before)
    other = type(drill)(**{**vars(drill), "seed": 8})(digit_labels, 10)
    assert not torch.equal(first.mask, other.mask)


@pytest.mark.parametrize("rate", [-0.1, 1.0, 1.5, float("nan"), "0.4"])
def test_a_rate_outside_zero_one_is_refused(rate):
    with pytest.raises(ValueError, match=r"rate must lie in \[0, 1\)"):
        SymmetricNoise(rate)
    with pytest.raises(ValueError, match=r"rate must lie in \[0, 1\)"):
        PairFlip(PAIRS, rate)


def test_bad_pairs_are_refused(digit_labels):
    with pytest.raises(ValueError, match="to themselves"):
        PairFlip({3: 3}, 0.2)
    with pytest.raises(ValueError, match=r"classes \[12\] outside \[0, 10\)"):
        PairFlip({4: 12}, 0.2)(digit_labels, num_classes=10)


def test_rate_zero_changes_nothing(digit_labels):
    assert not SymmetricNoise(0.0)(digit_labels, 10).mask.any()


@pytest.mark.parametrize(("rate", "n", "expected"), [(0.29, 50, 15), (0.5, 3, 2), (0.25, 2, 1), (0.4, 145, 58)])
def test_counts_round_halves_up_exactly(rate, n, expected):
    labels = torch.arange(n) % 2
    assert int(SymmetricNoise(rate)(labels, num_classes=2).mask.sum()) == expected == round_half_up(rate, n)
