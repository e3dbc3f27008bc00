"""BackdoorTrigger and FeatureShift: exact, deterministic, train only, and what training sees."""

import pytest
import torch
from helpers import RecordingClassifier, StructuredDigits, split_batch, trainer_kwargs
from lightning.pytorch import Callback, Trainer

from robust_lightning import RobustDataModule
from robust_lightning.data import DigitsDataModule
from robust_lightning.poison import BackdoorTrigger, FeatureShift, stamp_trigger
from robust_lightning.poison.base import count_for


@pytest.mark.parametrize("structure", ["tuple", "list", "dict"])
def test_training_sees_the_trigger_and_target_label_exactly_on_the_poisoned_ids(structure):
    drill = BackdoorTrigger(target=0, rate=0.1, seed=3)
    dm = RobustDataModule(StructuredDigits(structure, shuffle=True), poison=drill)
    model = RecordingClassifier()
    Trainer(**trainer_kwargs(limit_val_batches=0)).fit(model, datamodule=dm)
    clean = dm.datamodule.train_set
    mask = dm.poison_mask
    assert int(mask.sum()) == count_for(0.1, len(clean))
    assert not any(
        int(clean[i][1] if structure != "dict" else clean[i]["label"]) == 0 for i in mask.nonzero().flatten()
    )
    for _, batch, ids in model.seen:
        x, y = split_batch(batch)
        for row, i in zip(range(len(ids)), ids.tolist()):
            original = clean[i]["image"] if structure == "dict" else clean[i][0]
            if mask[i]:
                assert torch.equal(x[row], stamp_trigger(original)) and int(y[row]) == 0
            else:
                assert torch.equal(x[row], original)


def test_the_triggered_test_copy_keeps_true_labels_and_skips_the_target_class():
    dm = DigitsDataModule()
    dm.setup("test")
    triggered = BackdoorTrigger(target=0, rate=0.1).triggered(dm.test_set)
    labels = dm.test_set.tensors[1]
    assert len(triggered) == int((labels != 0).sum())
    x, y = triggered[0]
    assert y != 0 and torch.all(x[:, -2:, -2:] == 1.0)
    assert torch.equal(dm.test_set.tensors[0][triggered.ids[0]][:, :6, :6], x[:, :6, :6])


def test_attack_success_rate_counts_target_answers():
    dm = DigitsDataModule()
    dm.setup("test")
    drill = BackdoorTrigger(target=3, rate=0.1)

    def always(cls):
        return lambda x: torch.nn.functional.one_hot(torch.full((len(x),), cls), 10).float()

    assert drill.attack_success_rate(always(3), dm.test_set) == 1.0
    assert drill.attack_success_rate(always(5), dm.test_set) == 0.0


def test_triggers_fit_any_image_size_and_feature_vectors():
    image = stamp_trigger(torch.zeros(3, 32, 32), size=3, location=(4, 5), value=0.5)
    assert image[:, 4:7, 5:8].eq(0.5).all() and image.sum() == 0.5 * 27
    assert stamp_trigger(torch.zeros(6), size=2, location="top_left").tolist() == [1, 1, 0, 0, 0, 0]
    with pytest.raises(ValueError, match="does not fit"):
        stamp_trigger(torch.zeros(1, 2, 2), size=3)
    with pytest.raises(ValueError, match="location must be one of"):
        BackdoorTrigger(target=0, rate=0.1, location="middle")
    stamped = BackdoorTrigger(target=0, rate=0.1, location=(5, 5)).poison_input(torch.zeros(1, 8, 8))
    assert stamped[0, 5:7, 5:7].eq(1).all() and stamped.sum() == 4


def test_a_rate_larger_than_the_other_classes_is_refused():
    with pytest.raises(ValueError, match="Lower the rate"):
        BackdoorTrigger(target=0, rate=0.6)(torch.tensor([0, 0, 0, 1]), num_classes=2)


def test_feature_shift_moves_the_chosen_source_samples_toward_the_target_and_keeps_labels():
    drill = FeatureShift(source=3, target=8, rate=0.3, strength=0.5, seed=1)
    dm = RobustDataModule(DigitsDataModule(), poison=drill)
    dm.setup("fit")
    x, y = dm.datamodule.train_set.tensors
    mask = dm.poison_mask
    assert int(mask.sum()) == count_for(0.3, int((y == 3).sum())) and bool((y[mask] == 3).all())
    poisoned = torch.stack([dm._train[i][0][0] for i in mask.nonzero().flatten().tolist()])
    target_mean, source_mean = x[y == 8].mean(0), x[y == 3].mean(0)
    before = (x[mask] - target_mean).flatten(1).norm(dim=1)
    after = (poisoned - target_mean).flatten(1).norm(dim=1)
    assert bool((after < before).all()), "every shifted sample is closer to the target class"
    assert torch.allclose(poisoned, (x[mask] + 0.5 * (target_mean - source_mean)).clamp(0, 1))
    assert [int(dm._train[i][0][1]) for i in range(20)] == y[:20].tolist(), "labels stay"


def test_feature_shift_rejects_nonsense():
    with pytest.raises(ValueError, match="strength must be positive"):
        FeatureShift(source=1, target=2, rate=0.1, strength=-1)
    with pytest.raises(ValueError, match="two different classes"):
        FeatureShift(source=1, target=1, rate=0.1)


def test_input_drills_need_tensor_inputs():
    class NumpyDigits(StructuredDigits):
        def setup(self, stage):
            super().setup(stage)
            self.train_set.x = self.train_set.x.numpy()

    with pytest.raises(TypeError, match="needs them as torch tensors"):
        RobustDataModule(NumpyDigits(), poison=BackdoorTrigger(0, 0.1)).setup("fit")


class _ValLabels(Callback):
    def __init__(self):
        self.labels = []

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        self.labels.append(batch[1].clone())


def test_validation_data_is_never_poisoned():
    spy = _ValLabels()
    dm = RobustDataModule(StructuredDigits(), poison=BackdoorTrigger(0, 0.1))
    trainer = Trainer(**trainer_kwargs(callbacks=[spy], limit_train_batches=1, num_sanity_val_steps=0))
    trainer.fit(RecordingClassifier(), datamodule=dm)
    assert torch.equal(torch.cat(spy.labels), dm.datamodule.val_set.y)
