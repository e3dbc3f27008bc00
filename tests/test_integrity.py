"""Integrity manifests: every single-sample tamper is caught before training and named by id."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import trainer_kwargs
from lightning.pytorch import Trainer
from torch.utils.data import TensorDataset

from robust_lightning import RobustDataModule
from robust_lightning.data import DigitsDataModule
from robust_lightning.data.validation import scan_split
from robust_lightning.integrity import IntegrityError, Manifest, build_manifest
from robust_lightning.integrity.command import main as manifest_command
from robust_lightning.models import SmallCNN


class TamperedDigits(DigitsDataModule):
    """The digits with one change applied to the train split's tensors after they are loaded."""

    def __init__(self, tamper=None):
        super().__init__()
        self.tamper = tamper

    def setup(self, stage: str) -> None:
        fresh = self.train_set is None
        super().setup(stage)
        if fresh and self.tamper is not None:
            self.train_set = TensorDataset(*self.tamper(*(t.clone() for t in self.train_set.tensors)))


def _pixel(x, y):
    x[17, 0, 3, 3] += 1 / 16
    return x, y


def _label(x, y):
    y[42] = (y[42] + 1) % 10
    return x, y


def _added(x, y):
    return torch.cat([x, x[5:6].flip(-1)]), torch.cat([y, y[5:6]])


def _removed(x, y):
    keep = torch.arange(len(y)) != 100
    return x[keep], y[keep]


def _reordered(x, y):
    order = torch.arange(len(y))
    order[[7, 8]] = order[[8, 7]]
    return x[order], y[order]


@pytest.fixture(scope="module")
def manifest_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("manifest") / "digits.json"
    build_manifest(DigitsDataModule(), num_classes=10, progress=False).save(path)
    return path


def _fit(datamodule, **kwargs):
    trainer = Trainer(**trainer_kwargs(limit_train_batches=2, limit_val_batches=1, **kwargs))
    trainer.fit(SmallCNN(), datamodule=datamodule)
    return trainer


@pytest.mark.parametrize(
    ("tamper", "expected"),
    [
        (_pixel, "train: 1 changed: ids 17\n"),
        (_label, "train: 1 relabelled: ids 42 ("),
        (_added, "train: 1 added: at positions 1293\n"),
        (_removed, "train: 1 removed: ids 100\n"),
        (_reordered, "train: 2 moved: ids 7, 8\n"),
    ],
    ids=["pixel", "label", "added", "removed", "reordered"],
)
def test_every_single_sample_tamper_stops_training_and_is_named(manifest_path, tamper, expected):
    datamodule = RobustDataModule(TamperedDigits(tamper), manifest=manifest_path)
    with pytest.raises(IntegrityError) as caught:
        _fit(datamodule)
    message = str(caught.value)
    assert expected in message
    assert message.count("\n- ") == 1, "only the tampered sample is reported"


def test_untampered_data_trains_and_warn_mode_trains_on_with_a_warning(manifest_path):
    trainer = _fit(RobustDataModule(DigitsDataModule(), manifest=manifest_path))
    assert trainer.global_step == 2
    with pytest.warns(UserWarning, match=r"train: 1 relabelled: ids 42"):
        trainer = _fit(RobustDataModule(TamperedDigits(_label), manifest=manifest_path, on_mismatch="warn"))
    assert trainer.global_step == 2


def test_test_split_is_verified_before_testing(manifest_path):
    def _test_pixel(datamodule_cls):
        class TamperedTest(datamodule_cls):
            def setup(self, stage):
                fresh = self.test_set is None
                super().setup(stage)
                if fresh:
                    x, y = (t.clone() for t in self.test_set.tensors)
                    x[3] = 1 - x[3]
                    self.test_set = TensorDataset(x, y)

        return TamperedTest()

    datamodule = RobustDataModule(_test_pixel(DigitsDataModule), manifest=manifest_path)
    with pytest.raises(IntegrityError, match=r"test: 1 changed: ids 3\n"):
        Trainer(**trainer_kwargs()).test(SmallCNN(), datamodule=datamodule)

    datamodule = RobustDataModule(_test_pixel(DigitsDataModule), manifest=manifest_path)
    with pytest.warns(UserWarning, match=r"test: 1 changed: ids 3\n"):
        trainer = _fit(datamodule)
    assert trainer.global_step == 2, "a tampered test split does not stop training"
    with pytest.raises(IntegrityError, match=r"test: 1 changed: ids 3\n"):
        trainer.test(trainer.lightning_module, datamodule=datamodule)


def test_an_edited_manifest_is_refused(manifest_path, tmp_path):
    document = json.loads(manifest_path.read_text())
    document["splits"]["train"][0]["label"] = 9 - document["splits"]["train"][0]["label"]
    edited = tmp_path / "edited.json"
    edited.write_text(json.dumps(document))
    with pytest.raises(IntegrityError, match="does not match its own digest"):
        RobustDataModule(DigitsDataModule(), manifest=edited)
    with pytest.raises(IntegrityError, match="Cannot read the manifest"):
        Manifest.load(tmp_path / "missing.json")
    with pytest.raises(ValueError, match="on_mismatch must be 'error' or 'warn'"):
        RobustDataModule(DigitsDataModule(), manifest=manifest_path, on_mismatch="ignore")


def test_command_creates_and_verifies(tmp_path, capsys):
    path = tmp_path / "digits.json"
    assert manifest_command(["create", str(path)]) == 0
    assert Manifest.load(path).digest in capsys.readouterr().out
    assert manifest_command(["verify", str(path)]) == 0
    assert "OK: the data matches" in capsys.readouterr().out
    # Another split seed reshuffles which digits are train, val and test: every split differs.
    assert manifest_command(["verify", str(path), "data.seed=1"]) == 1
    assert "train:" in capsys.readouterr().err
    assert manifest_command(["verify", str(path), "data.sede=1"]) == 2
    assert "Could not override 'data.sede'" in capsys.readouterr().err


class EmptyValDigits(DigitsDataModule):
    def setup(self, stage: str) -> None:
        super().setup(stage)
        self.val_set = TensorDataset(torch.zeros(0, 1, 8, 8), torch.zeros(0, dtype=torch.long))


def test_command_refuses_an_empty_split_with_its_fix(tmp_path, capsys):
    path = tmp_path / "digits.json"
    assert manifest_command(["create", str(path), f"data._target_={__name__}.EmptyValDigits"]) == 2
    assert "The val split is empty. Fix:" in capsys.readouterr().err
    assert not path.exists()


def test_the_sample_digest_covers_dtype_and_entry_names():
    pixels = torch.arange(4, dtype=torch.int32)
    variants = [
        [{"x": pixels, "y": 0}],
        [{"x": pixels.view(torch.float32), "y": 0}],  # the same bytes read as another dtype
        [{"z": pixels, "y": 0}],  # the same tensor under another entry name
    ]
    digests = {scan_split("train", data, num_classes=1, target_key="y", check=False).digests[0] for data in variants}
    assert len(digests) == 3


def test_duplicated_samples_are_matched_with_their_labels():
    from robust_lightning.integrity import diff_split

    diff = diff_split([("a", 0), ("b", 1), ("a", 1)], [("b", 1), ("a", 1)])
    assert (diff.removed, diff.relabelled, diff.moved, diff.changed) == ([0], [], [], [])


def test_a_manifest_without_its_digest_is_refused(tmp_path):
    path = tmp_path / "m.json"
    path.write_text(json.dumps({"format": "robust-lightning-manifest/1", "splits": {}}))
    with pytest.raises(IntegrityError, match="Cannot read the manifest"):
        Manifest.load(path)
    path.write_text("[1, 2]")
    with pytest.raises(IntegrityError, match="Cannot read the manifest"):
        Manifest.load(path)
