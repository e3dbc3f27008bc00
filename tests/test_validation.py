import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import ListDataset, RecordingClassifier, StructuredDigits, trainer_kwargs
from lightning.pytorch import LightningDataModule, Trainer
from torch.utils.data import DataLoader

from robust_lightning import RobustDataModule
from robust_lightning.data import DataSummary, DataValidationError, DigitsDataModule
from robust_lightning.poison import PairFlip


class TamperedDigits(StructuredDigits):
    """The digits with one split altered by ``tamper(split_name, dataset)`` after setup."""

    def __init__(self, tamper, **kwargs):
        super().__init__(**kwargs)
        self.tamper = tamper

    def setup(self, stage):
        super().setup(stage)
        for name in ("train", "val", "test"):
            self.tamper(name, getattr(self, f"{name}_set"))


def setup_error(tamper, **kwargs) -> str:
    dm = RobustDataModule(TamperedDigits(tamper, **kwargs))
    with pytest.raises(DataValidationError) as info:
        dm.setup("fit")
    return str(info.value)


def test_nan_and_inf_values_are_named_by_id():
    def tamper(name, ds):
        if name == "train":
            ds.x[17, 0, 3, 3] = float("nan")
            ds.x[905, 0, 0, 0] = float("inf")

    message = setup_error(tamper)
    assert "train: 2 sample(s) (ids 17, 905) have NaN or inf values in sample[0]" in message
    assert "Fix:" in message


def test_labels_outside_the_class_range_are_named_by_id():
    def tamper(name, ds):
        if name == "val":
            ds.y[[3, 40]] = torch.tensor([10, -1])

    message = setup_error(tamper)
    assert "val: 2 sample(s) (ids 3, 40) have a label that is not an integer in [0, 10)" in message


def test_float_labels_are_refused():
    def tamper(name, ds):
        if name == "train":
            ds.y = ds.y.float()

    assert "have a label that is not an integer" in setup_error(tamper)


def test_many_bad_ids_are_counted_and_the_first_shown():
    def tamper(name, ds):
        if name == "train":
            ds.x[:25] = float("nan")

    assert "25 sample(s) (ids 0, 1, 2, 3, 4, 5, 6, 7, 8, 9 and 15 more)" in setup_error(tamper)


def test_a_sample_of_another_shape_or_dtype_is_named_by_id():
    x = list(torch.rand(30, 1, 8, 8))
    x[4] = torch.rand(1, 8, 7)
    x[9] = x[9].double()
    samples = [(xi, i % 10) for i, xi in enumerate(x)]

    class Odd(LightningDataModule):
        num_classes = 10

        def train_dataloader(self):
            return DataLoader(ListDataset(samples), batch_size=4)

    with pytest.raises(DataValidationError) as info:
        RobustDataModule(Odd()).setup("fit")
    message = str(info.value)
    assert "train: 2 sample(s) (ids 4, 9) differ in shape or dtype of sample[0]" in message


def test_a_sample_of_another_structure_is_named_by_id():
    samples = [(torch.rand(2), 0)] * 5 + [(torch.rand(2), 1, "extra")]

    class Odd(LightningDataModule):
        num_classes = 2

        def train_dataloader(self):
            return DataLoader(ListDataset(samples))

    with pytest.raises(DataValidationError, match=r"ids 5\) differ in structure"):
        RobustDataModule(Odd()).setup("fit")


@pytest.mark.parametrize("split", ["train", "val"])
def test_an_empty_split_is_refused_with_the_fix(split):
    def tamper(name, ds):
        if name == split:
            ds.x, ds.y = ds.x[:0], ds.y[:0]

    for shuffle in (True, False):
        message = setup_error(tamper, shuffle=shuffle)
        assert f"The {split} split is empty" in message and "Fix:" in message


def test_missing_num_classes_says_what_to_pass():
    class NoClasses(LightningDataModule):
        pass

    with pytest.raises(ValueError, match="Pass num_classes="):
        RobustDataModule(NoClasses())


def test_a_dict_sample_without_a_known_label_key_says_to_pass_target_key():
    class Odd(LightningDataModule):
        num_classes = 2

        def train_dataloader(self):
            return DataLoader(ListDataset([{"pixels": torch.rand(2), "digit": 1}] * 4))

    with pytest.raises(KeyError, match="target_key="):
        RobustDataModule(Odd()).setup("fit")
    dm = RobustDataModule(Odd(), target_key="digit")
    dm.setup("fit")
    assert dm.num_train == 4


def test_validation_can_be_switched_off():
    def tamper(name, ds):
        ds.x[0, 0, 0, 0] = float("nan")

    dm = RobustDataModule(TamperedDigits(tamper), validate=False)
    dm.setup("fit")
    assert dm.summary is None and dm.num_train == 1293


def test_the_summary_counts_classes_imbalance_and_train_test_duplicates(caplog):
    def tamper(name, ds):
        if name == "test":
            # Leak: copy two train images into the test set.
            train = StructuredDigits()
            train.setup("fit")
            ds.x[[5, 6]] = train.train_set.x[[100, 200]]

    dm = RobustDataModule(TamperedDigits(tamper), poison=PairFlip({4: 8}, rate=0.5))
    with caplog.at_level(logging.INFO, logger="robust_lightning"):
        dm.setup("fit")
    summary = dm.summary
    digits = DigitsDataModule()
    digits.setup("fit")
    expected = torch.bincount(digits.train_set.tensors[1], minlength=10).tolist()
    assert summary.counts["train"] == expected
    assert summary.imbalance_ratio == pytest.approx(max(expected) / min(expected))
    assert sorted(summary.duplicates) == [(100, 5), (200, 6)]
    assert summary.poisoned[4] == round(0.5 * expected[4]) and sum(summary.poisoned) == summary.poisoned[4]
    assert "exact duplicates between train and test: 2 (train 100 = test 5, train 200 = test 6)" in caplog.text


def test_val_and_test_splits_are_never_poisoned():
    dm = RobustDataModule(StructuredDigits(shuffle=False), poison=PairFlip({4: 8, 8: 4}, rate=0.9))
    model = RecordingClassifier()
    trainer = Trainer(**trainer_kwargs())
    trainer.fit(model, datamodule=dm)
    clean = StructuredDigits()
    clean.setup("fit")
    for split in ("val", "test"):
        loader = getattr(dm, f"{split}_dataloader")()
        assert torch.equal(torch.cat([y for _, y in loader]), getattr(clean, f"{split}_set").y)
    trained_labels = torch.cat([batch[1] for _, batch, _ in model.seen])
    assert torch.equal(trained_labels != clean.train_set.y, dm.poison_mask)


def test_a_validation_error_stops_trainer_fit_before_any_step():
    def tamper(name, ds):
        if name == "train":
            ds.x[3] = float("nan")

    model = RecordingClassifier()
    with pytest.raises(DataValidationError, match="ids 3"):
        Trainer(**trainer_kwargs()).fit(model, datamodule=RobustDataModule(TamperedDigits(tamper)))
    assert model.seen == []


def test_leaves_without_a_numeric_form_are_accepted_and_odd_dtypes_checked():
    paths = [Path(f"img{i}.png") for i in range(6)]
    x = torch.rand(6, 4).to(torch.bfloat16)
    x[2, 1] = float("nan")
    samples = [
        {"x": x[i], "label": i % 2, "path": paths[i], "note": None, "tags": np.array(["a", "b"])} for i in range(6)
    ]

    class Odd(LightningDataModule):
        num_classes = 2

        def train_dataloader(self):
            return DataLoader(ListDataset(samples), batch_size=2, collate_fn=list)

    with pytest.raises(DataValidationError) as info:
        RobustDataModule(Odd()).setup("fit")
    assert str(info.value).count("\n- ") == 1
    assert "1 sample(s) (ids 2) have NaN or inf values in sample['x']" in str(info.value)


def test_a_sample_without_its_label_is_named_by_id():
    samples = [{"x": torch.rand(2), "label": 1}] * 4 + [{"x": torch.rand(2)}]

    class Odd(LightningDataModule):
        num_classes = 2

        def train_dataloader(self):
            return DataLoader(ListDataset(samples))

    with pytest.raises(DataValidationError) as info:
        RobustDataModule(Odd()).setup("fit")
    assert "1 sample(s) (ids 4) have a label that is not an integer" in str(info.value)
    assert "(ids 4) differ in structure" in str(info.value)


def test_problems_of_the_test_split_warn_at_fit_and_stop_trainer_test():
    def tamper(name, ds):
        if name == "test":
            ds.y[:] = -1  # an unlabelled test set

    dm = RobustDataModule(TamperedDigits(tamper))
    model = RecordingClassifier()
    trainer = Trainer(**trainer_kwargs())
    with pytest.warns(UserWarning, match="test: 360 sample"):
        trainer.fit(model, datamodule=dm)
    assert model.seen and dm.summary.counts["test"] == [0] * 10
    with pytest.raises(DataValidationError, match="test: 360 sample"):
        trainer.test(model, datamodule=dm)


def test_num_classes_may_be_a_numpy_integer():
    assert RobustDataModule(StructuredDigits(), num_classes=np.int64(10)).num_classes == 10


def test_an_empty_class_makes_the_imbalance_infinite_and_is_named():
    summary = DataSummary(3, {"train": [500, 5, 0]}, duplicates=[])
    assert summary.imbalance_ratio == float("inf")
    assert "classes with no training sample: [2]" in str(summary)


def test_flipped_numpy_images_are_checked_and_fingerprinted_by_content():
    rng = np.random.default_rng(0)
    images = [np.pad(rng.random((6, 6, 3)), ((1, 1), (1, 1), (0, 0)))[..., ::-1] for _ in range(8)]
    images[3][4, 4, 0] = np.nan

    class Flipped(LightningDataModule):
        num_classes = 2

        def train_dataloader(self):
            return DataLoader(ListDataset([(img, i % 2) for i, img in enumerate(images[:5])]))

        def test_dataloader(self):
            return DataLoader(ListDataset([(img, 0) for img in [images[0], *images[5:]]]))

    with pytest.raises(DataValidationError, match=r"ids 3\) have NaN or inf"):
        RobustDataModule(Flipped()).setup("fit")
    images[3][4, 4, 0] = 0.5
    dm = RobustDataModule(Flipped())
    dm.setup("fit")
    assert dm.summary.duplicates == [(0, 0)]
