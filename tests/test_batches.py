"""The user's batch reaches training_step unchanged, and the ids of its samples are known."""

import numpy as np
import pytest
import torch
from helpers import ListDataset, RecordingClassifier, StructuredDigits, split_batch, trainer_kwargs
from lightning.pytorch import Trainer

from robust_lightning import RobustDataModule
from robust_lightning.poison import PairFlip

STRUCTURES = ["tuple", "list", "dict"]


def assert_same_batch(got, expected):
    assert type(got) is type(expected)
    if isinstance(expected, dict):
        assert got.keys() == expected.keys()
        pairs = [(got[k], expected[k]) for k in expected]
    else:
        assert len(got) == len(expected)
        pairs = list(zip(got, expected))
    for a, b in pairs:
        assert a.dtype == b.dtype and torch.equal(a, b)


@pytest.mark.parametrize("structure", STRUCTURES)
def test_unshuffled_batches_are_exactly_the_users_and_ids_run_in_order(structure):
    user_dm = StructuredDigits(structure, shuffle=False)
    model = RecordingClassifier()
    Trainer(**trainer_kwargs()).fit(model, datamodule=RobustDataModule(user_dm))
    expected = list(user_dm.train_dataloader())
    assert len(model.seen) == len(expected)
    for (_, batch, ids), reference in zip(model.seen, expected):
        assert_same_batch(batch, reference)
    assert torch.cat([ids for _, _, ids in model.seen]).tolist() == list(range(len(user_dm.train_set)))


@pytest.mark.parametrize("structure", STRUCTURES)
def test_shuffled_batches_hold_the_samples_their_ids_name(structure):
    user_dm = StructuredDigits(structure, shuffle=True)
    model = RecordingClassifier()
    Trainer(**trainer_kwargs(max_epochs=2)).fit(model, datamodule=RobustDataModule(user_dm))
    for _, batch, ids in model.seen:
        x, y = split_batch(batch)
        assert torch.equal(x, user_dm.train_set.x[ids]) and torch.equal(y, user_dm.train_set.y[ids])
    epochs = model.ids_by_epoch()
    for ids in epochs.values():
        assert sorted(ids) == list(range(len(user_dm.train_set)))
    assert epochs[0] != epochs[1], "each epoch is shuffled anew"


class HookedClassifier(RecordingClassifier):
    """Overrides the batch-transfer hooks, as users do to normalise or reformat on the device."""

    def __init__(self):
        super().__init__()
        self.calls = {"before": 0, "transfer": 0, "after": 0}

    def on_before_batch_transfer(self, batch, dataloader_idx):
        self.calls["before"] += 1
        x, y = batch
        return x * 2, y

    def transfer_batch_to_device(self, batch, device, dataloader_idx):
        self.calls["transfer"] += 1
        return super().transfer_batch_to_device(batch, device, dataloader_idx)

    def on_after_batch_transfer(self, batch, dataloader_idx):
        self.calls["after"] += 1
        x, y = batch
        return {"image": x - 1, "label": y}


def test_a_module_that_overrides_the_batch_transfer_hooks_keeps_working():
    user_dm = StructuredDigits("tuple", shuffle=True)
    model = HookedClassifier()
    trainer = Trainer(**trainer_kwargs(limit_val_batches=0))
    trainer.fit(model, datamodule=RobustDataModule(user_dm))
    n_batches = len(model.seen)
    assert model.calls == {"before": n_batches, "transfer": n_batches, "after": n_batches}
    for _, batch, ids in model.seen:
        assert torch.equal(batch["image"], user_dm.train_set.x[ids] * 2 - 1)


class HookedDigits(StructuredDigits):
    """A datamodule that overrides the hooks itself; Lightning then prefers it over the module's."""

    def on_before_batch_transfer(self, batch, dataloader_idx):
        x, y = batch
        return x + 10, y

    def on_after_batch_transfer(self, batch, dataloader_idx):
        x, y = batch
        return [x, y]


def test_a_datamodule_that_overrides_the_batch_transfer_hooks_keeps_working():
    user_dm = HookedDigits("tuple", shuffle=True)
    model = RecordingClassifier()
    Trainer(**trainer_kwargs(limit_val_batches=0)).fit(model, datamodule=RobustDataModule(user_dm))
    for _, batch, ids in model.seen:
        assert isinstance(batch, list)
        assert torch.equal(batch[0], user_dm.train_set.x[ids] + 10)


def test_reading_ids_without_the_wrapper_says_how_to_wrap():
    model = RecordingClassifier()
    with pytest.raises(TypeError, match=r"RobustDataModule\(your_datamodule\)"):
        Trainer(**trainer_kwargs()).fit(model, datamodule=StructuredDigits())


def test_loaders_the_wrapper_cannot_rebuild_are_refused_with_the_fix():
    class Weighted(StructuredDigits):
        def train_dataloader(self):
            weights = torch.ones(len(self.train_set))
            sampler = torch.utils.data.WeightedRandomSampler(weights, len(weights))
            return torch.utils.data.DataLoader(self.train_set, sampler=sampler, batch_size=8)

    with pytest.raises(TypeError, match="custom sampler .WeightedRandomSampler.*Return a plain torch DataLoader"):
        RobustDataModule(Weighted()).setup("fit")


def test_workers_and_user_loader_settings_are_kept():
    class Workers(StructuredDigits):
        def train_dataloader(self):
            return torch.utils.data.DataLoader(
                self.train_set, batch_size=50, shuffle=True, num_workers=2, drop_last=True
            )

    user_dm = Workers("dict")
    model = RecordingClassifier()
    Trainer(**trainer_kwargs(limit_val_batches=0)).fit(model, datamodule=RobustDataModule(user_dm))
    assert len(model.seen) == len(user_dm.train_set) // 50
    for _, batch, ids in model.seen:
        assert len(ids) == 50 and torch.equal(batch["image"], user_dm.train_set.x[ids])


class LabelTypeDigits(StructuredDigits):
    """Labels as a user's dataset may hold them: python ints, numpy scalars or arrays, tensors of shape (1,)."""

    def __init__(self, label_type):
        super().__init__(shuffle=False)
        self.label_type = label_type

    def setup(self, stage):
        super().setup(stage)
        convert = {
            "int": int,
            "numpy scalar": np.int64,
            "numpy 0-d array": np.array,
            "tensor (1,)": lambda y: torch.tensor([y]),
            "list": lambda y: [y],
        }[self.label_type]
        base = self.train_set
        self.train_set = ListDataset([(base.x[i], convert(int(base.y[i]))) for i in range(len(base))])


@pytest.mark.parametrize("label_type", ["int", "numpy scalar", "numpy 0-d array", "tensor (1,)", "list"])
def test_poisoned_labels_keep_the_users_label_type(label_type):
    user_dm = LabelTypeDigits(label_type)
    dm = RobustDataModule(user_dm, poison=PairFlip({4: 8, 8: 4}, rate=0.5))
    model = RecordingClassifier()
    Trainer(**trainer_kwargs(limit_val_batches=0)).fit(model, datamodule=dm)
    reference = list(user_dm.train_dataloader())
    labels = torch.cat([split_batch(batch)[1] for _, batch, _ in model.seen])
    clean = torch.cat([split_batch(batch)[1] for batch in reference])
    assert [type(batch[1]) for _, batch, _ in model.seen] == [type(batch[1]) for batch in reference]
    assert torch.equal(labels != clean, dm.poison_mask)
    assert (labels[dm.poison_mask] == 12 - clean[dm.poison_mask]).all()


def test_when_both_datamodule_and_module_override_the_hook_the_user_is_told_which_runs():
    model = HookedClassifier()
    with pytest.warns(UserWarning, match="only the datamodule's runs"):
        Trainer(**trainer_kwargs(limit_val_batches=0)).fit(model, datamodule=RobustDataModule(HookedDigits()))
    assert model.calls["before"] == 0
