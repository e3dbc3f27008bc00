"""FeatureCollision and LabelConsistentBackdoor: bounded, correctly labelled poisons with an exact mask, and real threats."""

import pytest
import torch
from helpers import trainer_kwargs
from lightning.pytorch import Trainer
from torch import nn

from robust_lightning import RobustDataModule
from robust_lightning.data import DigitsDataModule
from robust_lightning.models import SmallCNN
from robust_lightning.poison import FeatureCollision, LabelConsistentBackdoor, stamp_trigger
from robust_lightning.poison.surrogate import train_surrogate


@pytest.fixture(scope="module")
def digits():
    data = DigitsDataModule()
    data.setup("fit")
    return data


def random_features(seed: int = 0) -> nn.Module:
    """An untrained extractor: enough for the contracts, which hold for any model."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.ReLU()).eval()


def collision(digits, **changes) -> FeatureCollision:
    settings = {"target_ids": [0, 1], "base_class": 3, "count": 4, "targets": digits.test_set, "eps": 0.2, "steps": 30}
    return FeatureCollision(**{**settings, "features": random_features(), **changes})


def backdoor(**changes) -> LabelConsistentBackdoor:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    return LabelConsistentBackdoor(**{"target": 2, "rate": 0.25, "eps": 0.2, "steps": 5, "model": model, **changes})


def inject(drill, digits):
    x, y = digits.train_set.tensors
    return drill.inject(lambda ids: x[ids], y, num_classes=10)


def test_feature_collision_adds_bounded_correctly_labelled_poisons_closer_to_their_target(digits):
    drill = collision(digits)
    x, y = digits.train_set.tensors
    added = inject(drill, digits)
    assert len(added.labels) == 8 and (added.labels == 3).all() and (y[added.sources] == 3).all()
    assert len(set(added.sources.tolist())) == 8, "bases are drawn without replacement"
    change = added.inputs - x[added.sources]
    assert change.abs().max() <= drill.eps + 1e-6 and added.inputs.min() >= 0 and added.inputs.max() <= 1
    goals = drill._features(drill.target_inputs).repeat_interleave(4, 0)
    before = (drill._features(x[added.sources]) - goals).norm(dim=1)
    after = (drill._features(added.inputs) - goals).norm(dim=1)
    assert (after < before).all()


def test_label_consistent_backdoor_adds_triggered_adversarial_copies_of_the_target_class(digits):
    drill = backdoor()
    x, y = digits.train_set.tensors
    added = inject(drill, digits)
    assert len(added.labels) == round(0.25 * int((y == 2).sum())) and (added.labels == 2).all()
    assert (y[added.sources] == 2).all()
    assert torch.equal(added.inputs, torch.stack([stamp_trigger(p) for p in added.inputs])), "the trigger is on"
    change = (added.inputs - x[added.sources])[..., :6, :]  # rows outside the trigger
    assert 0 < change.abs().max() <= drill.eps + 1e-6


@pytest.mark.parametrize("make", [collision, lambda digits, **changes: backdoor(**changes)])
def test_the_drills_are_deterministic_by_seed(digits, make):
    first, again, other = (inject(make(digits, seed=seed), digits) for seed in (0, 0, 1))
    assert torch.equal(first.inputs, again.inputs) and torch.equal(first.sources, again.sources)
    assert not torch.equal(first.sources, other.sources)


def test_robust_data_module_trains_on_the_poisons_and_masks_exactly_them(digits):
    drill = collision(digits)
    data = RobustDataModule(DigitsDataModule(), poison=drill)
    Trainer(**trainer_kwargs(max_epochs=1, limit_val_batches=0)).fit(SmallCNN(), datamodule=data)
    n = len(digits.train_set)
    assert data.num_train == n + 8 and data.poison_mask[n:].all() and not data.poison_mask[:n].any()
    added = inject(collision(digits), digits)
    assert torch.equal(data.training_sample(n)[0], added.inputs[0]) and int(data.training_sample(n)[1]) == 3


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda d: collision(d, target_ids=[]), "target_ids must name at least one target"),
        (lambda d: collision(d, target_ids=[5000]), "target_ids [5000] lie outside the 360 samples"),
        (lambda d: collision(d, count=0), "count must be a positive integer"),
        (lambda d: collision(d, eps=0), "eps must be positive"),
        (lambda d: collision(d, base_class=int(d.test_set.tensors[1][0])), "is already of base_class"),
        (lambda d: inject(collision(d, count=100), d), "need 200 bases, but class 3 has"),
        (lambda d: inject(collision(d, base_class=12), d), "base_class=12 is not a class"),
        (lambda d: backdoor(rate=0), "rate (of the target class to poison) must lie in (0, 1]"),
        (lambda d: backdoor(eps=-1), "eps must be positive"),
        (lambda d: backdoor(trigger={"size": 2, "location": "middle"}), "location must be one of"),
        (lambda d: inject(backdoor(target=10), d), "target=10 is not a class"),
        (lambda d: inject(backdoor(model=None), DigitsLike()), "Pass your own trained model"),
    ],
)
def test_bad_arguments_fail_with_the_fix(digits, make, message):
    with pytest.raises(ValueError) as raised:
        make(digits)
    assert message in str(raised.value)


class DigitsLike:
    """Feature vectors, not images: the drills cannot train their SmallCNN on them."""

    train_set = torch.utils.data.TensorDataset(torch.rand(20, 64), torch.arange(20) % 4)


@pytest.mark.slow
def test_the_label_consistent_backdoor_is_a_real_threat_on_the_digits(digits):
    drill = LabelConsistentBackdoor(target=0, rate=1.0, eps=0.3)
    poisoned, clean = SmallCNN(), SmallCNN()
    for model, poison in ((poisoned, drill), (clean, None)):
        torch.manual_seed(0)
        Trainer(**trainer_kwargs(max_epochs=40, limit_val_batches=0)).fit(
            model, datamodule=RobustDataModule(DigitsDataModule(), poison=poison)
        )
    assert drill.attack_success_rate(clean, digits.test_set) < 0.05
    assert drill.attack_success_rate(poisoned, digits.test_set) > 0.3


@pytest.mark.slow
def test_feature_collision_takes_targets_in_the_transfer_setting(digits):
    x, y = digits.train_set.tensors
    victim = train_surrogate(x, y, 10, seed=0)
    others = (digits.test_set.tensors[1] != 0).nonzero().flatten()[:4].tolist()
    drill = FeatureCollision(others, base_class=0, count=25, targets=digits.test_set, eps=1.0, features=victim.features)
    added = inject(drill, digits)
    taken = 0
    for k in range(len(others)):
        features = victim.features(torch.cat([x, added.inputs[25 * k : 25 * (k + 1)]]))
        labels = torch.cat([y, added.labels[:25]])
        head = nn.Linear(64, 10)
        optimizer = torch.optim.Adam(head.parameters(), lr=1e-2)
        for _ in range(300):
            optimizer.zero_grad()
            nn.functional.cross_entropy(head(features), labels).backward()
            optimizer.step()
        taken += int(head(victim.features(drill.target_inputs[k : k + 1])).argmax(1) == 0)
    assert taken >= 1
