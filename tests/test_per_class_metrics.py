import pytest
import torch
from helpers import RecordingClassifier, StructuredDigits, split_batch, trainer_kwargs
from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from sklearn.metrics import confusion_matrix, precision_recall_fscore_support

from robust_lightning import RobustDataModule
from robust_lightning.callbacks import PerClassMetrics


def predictions(model, loader):
    model.eval()
    with torch.no_grad():
        pairs = [(model(x).argmax(1), y) for x, y in map(split_batch, loader)]
    return torch.cat([p for p, _ in pairs]).numpy(), torch.cat([y for _, y in pairs]).numpy()


@pytest.mark.parametrize("structure", ["tuple", "dict"])
def test_values_match_sklearn_on_the_same_predictions(structure):
    user_dm = StructuredDigits(structure)
    metrics = PerClassMetrics(num_classes=10)
    model = RecordingClassifier(lr=0.05)
    trainer = Trainer(**trainer_kwargs(max_epochs=2, callbacks=[metrics]))
    trainer.fit(model, datamodule=RobustDataModule(user_dm))
    trainer.test(model, datamodule=RobustDataModule(user_dm), verbose=False)

    predicted, truth = predictions(model, user_dm.test_dataloader())
    precision, recall, f1, support = precision_recall_fscore_support(
        truth, predicted, labels=range(10), zero_division=0
    )
    record = metrics.last("test")
    assert record["precision"] == pytest.approx(precision, abs=1e-6)
    assert record["recall"] == pytest.approx(recall, abs=1e-6)
    assert record["accuracy"] == pytest.approx(recall, abs=1e-6)
    assert record["f1"] == pytest.approx(f1, abs=1e-6)
    assert record["support"] == support.tolist()
    assert record["confusion"] == confusion_matrix(truth, predicted, labels=range(10)).tolist()
    logged = trainer.callback_metrics
    assert float(logged["test/recall/3"]) == pytest.approx(recall[3], abs=1e-6)
    assert float(logged["test/f1/macro"]) == pytest.approx(f1.mean(), abs=1e-6)


def test_history_has_one_val_record_per_epoch_and_skips_the_sanity_check():
    metrics = PerClassMetrics(num_classes=10, class_names=[f"digit{i}" for i in range(10)])
    trainer = Trainer(**trainer_kwargs(max_epochs=3, callbacks=[metrics], num_sanity_val_steps=2))
    trainer.fit(RecordingClassifier(lr=0.05), datamodule=RobustDataModule(StructuredDigits()))
    assert [(r["stage"], r["epoch"]) for r in metrics.history] == [("val", 0), ("val", 1), ("val", 2)]
    assert sum(metrics.history[-1]["support"]) == 144
    assert "val/precision/digit7" in trainer.callback_metrics
    assert metrics.history[-1]["recall"] != metrics.history[0]["recall"]


def test_history_is_restored_from_a_checkpoint(tmp_path):
    metrics = PerClassMetrics(num_classes=10)
    checkpoint = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    Trainer(**trainer_kwargs(max_epochs=2, enable_checkpointing=True, callbacks=[metrics, checkpoint])).fit(
        RecordingClassifier(), datamodule=RobustDataModule(StructuredDigits())
    )
    restored = PerClassMetrics(num_classes=10)
    trainer = Trainer(**trainer_kwargs(max_epochs=3, callbacks=[restored], default_root_dir=tmp_path))
    trainer.fit(
        RecordingClassifier(), datamodule=RobustDataModule(StructuredDigits()), ckpt_path=tmp_path / "last.ckpt"
    )
    assert restored.history[:2] == metrics.history
    assert [r["epoch"] for r in restored.history] == [0, 1, 2]


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="integer >= 2"):
        PerClassMetrics(num_classes=1)
    with pytest.raises(ValueError, match="3 distinct names"):
        PerClassMetrics(num_classes=3, class_names=["a", "a", "b"])


@pytest.mark.slow
def test_under_ddp_the_logged_values_cover_both_ranks(tmp_path):
    # 144 validation samples split evenly over 2 ranks: no padding, so the synced values
    # must equal those of one process evaluating the same weights on the whole set.
    metrics = PerClassMetrics(num_classes=10)
    model = RecordingClassifier(lr=0.05)
    trainer = Trainer(**trainer_kwargs(max_epochs=2, devices=2, strategy="ddp_spawn", callbacks=[metrics]))
    trainer.fit(model, datamodule=RobustDataModule(StructuredDigits(batch_size=36)))
    user_dm = StructuredDigits()
    user_dm.setup("fit")
    predicted, truth = predictions(model, user_dm.val_dataloader())
    _, recall, f1, _ = precision_recall_fscore_support(truth, predicted, labels=range(10), zero_division=0)
    logged = trainer.callback_metrics
    assert [float(logged[f"val/recall/{c}"]) for c in range(10)] == pytest.approx(recall, abs=1e-6)
    assert float(logged["val/f1/macro"]) == pytest.approx(f1.mean(), abs=1e-6)
