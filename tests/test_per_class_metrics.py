import json

import pytest
import torch
from helpers import DumpHistory, RecordingClassifier, StructuredDigits, split_batch, trainer_kwargs
from lightning.pytorch import Trainer, seed_everything
from lightning.pytorch.callbacks import ModelCheckpoint
from sklearn.metrics import confusion_matrix, f1_score, precision_recall_fscore_support, recall_score
from torch.utils.data import DataLoader, DistributedSampler

from robust_lightning import RobustDataModule
from robust_lightning.callbacks import PerClassMetrics
from robust_lightning.callbacks.per_class_metrics import ClassAlert
from robust_lightning.data import DigitsDataModule
from robust_lightning.models import SmallCNN
from robust_lightning.poison import PairFlip


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
    assert float(logged["test/f1/macro"]) == pytest.approx(f1_score(truth, predicted, average="macro"), abs=1e-6)


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


def test_testing_a_checkpoint_of_this_fit_keeps_the_history(tmp_path):
    metrics = PerClassMetrics(num_classes=10)
    checkpoint = ModelCheckpoint(dirpath=tmp_path, monitor="val/accuracy/macro", mode="min")  # an early epoch
    trainer = Trainer(**trainer_kwargs(max_epochs=3, enable_checkpointing=True, callbacks=[metrics, checkpoint]))
    datamodule = RobustDataModule(StructuredDigits())
    trainer.fit(RecordingClassifier(), datamodule=datamodule)
    trainer.test(datamodule=datamodule, ckpt_path="best", verbose=False)
    best = torch.load(checkpoint.best_model_path, weights_only=False)["epoch"]
    assert best < trainer.current_epoch == 3
    assert [(r["stage"], r["epoch"]) for r in metrics.history] == [("val", 0), ("val", 1), ("val", 2), ("test", best)]
    trainer.test(RecordingClassifier(), datamodule=datamodule, verbose=False)  # no checkpoint: the trainer's epoch
    assert metrics.history[-1]["epoch"] == 3
    fresh = PerClassMetrics(num_classes=10)  # a new process testing the checkpoint gets the fit's history
    Trainer(**trainer_kwargs(callbacks=[fresh])).test(
        RecordingClassifier(), datamodule=datamodule, ckpt_path=checkpoint.best_model_path, verbose=False
    )
    assert [r["stage"] for r in fresh.history][-1] == "test" and len(fresh.history) >= 2


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="integer >= 2"):
        PerClassMetrics(num_classes=1)
    with pytest.raises(ValueError, match="3 distinct names"):
        PerClassMetrics(num_classes=3, class_names=["a", "a", "b"])


@pytest.mark.parametrize(("config", "model_width"), [(10, 8), (12, 10)])
def test_a_model_whose_output_width_disagrees_stops_before_training_naming_all_three(config, model_width):
    metrics = PerClassMetrics(num_classes=config)
    trainer = Trainer(**trainer_kwargs(max_epochs=1, callbacks=[metrics]))
    with pytest.raises(ValueError, match="The number of classes disagrees") as raised:
        trainer.fit(SmallCNN(num_classes=model_width), datamodule=RobustDataModule(DigitsDataModule()))
    assert trainer.global_step == 0
    assert f"({model_width} classes), PerClassMetrics has num_classes={config}" in str(raised.value)
    assert "the data's is RobustDataModule.num_classes is 10" in str(raised.value)


@pytest.mark.slow
def test_under_ddp_the_values_equal_one_process_on_the_whole_set(tmp_path):
    # 143 validation samples over 2 ranks: DDP pads one repeat, which must not be counted, and the
    # spawned ranks must not share metric state. The values must equal sklearn's on the whole set.
    metrics = PerClassMetrics(num_classes=10)
    model = RecordingClassifier(lr=0.05)
    callbacks = [metrics, DumpHistory(str(tmp_path))]
    trainer = Trainer(**trainer_kwargs(max_epochs=2, devices=2, strategy="ddp_spawn", callbacks=callbacks))
    trainer.fit(model, datamodule=RobustDataModule(StructuredDigits(batch_size=36, val_size=143)))
    user_dm = StructuredDigits(val_size=143)
    user_dm.setup("fit")
    predicted, truth = predictions(model, user_dm.val_dataloader())
    precision, recall, _, _ = precision_recall_fscore_support(truth, predicted, labels=range(10), zero_division=0)
    logged = trainer.callback_metrics
    assert [float(logged[f"val/recall/{c}"]) for c in range(10)] == pytest.approx(recall, abs=1e-6)
    assert [float(logged[f"val/precision/{c}"]) for c in range(10)] == pytest.approx(precision, abs=1e-6)
    assert float(logged["val/f1/macro"]) == pytest.approx(f1_score(truth, predicted, average="macro"), abs=1e-6)
    for rank in range(2):
        last = json.loads((tmp_path / f"history{rank}.json").read_text())[-1]
        assert sum(last["support"]) == 143
        assert last["confusion"] == confusion_matrix(truth, predicted, labels=range(10)).tolist()


def test_the_macro_average_skips_classes_absent_from_labels_and_predictions():
    # Three classes, only 0 and 1 in the test set: a class that never occurs must not count as 0.
    class TwoClassDigits(StructuredDigits):
        num_classes = 3

        def setup(self, stage):
            super().setup(stage)
            for split in (self.train_set, self.val_set, self.test_set):
                keep = split.y < 2
                split.x, split.y = split.x[keep], split.y[keep]

    metrics = PerClassMetrics(num_classes=3)
    model = RecordingClassifier(lr=0.1, num_classes=3)
    trainer = Trainer(**trainer_kwargs(max_epochs=3, callbacks=[metrics]))
    trainer.fit(model, datamodule=RobustDataModule(TwoClassDigits(), num_classes=3))
    trainer.test(model, datamodule=RobustDataModule(TwoClassDigits(), num_classes=3), verbose=False)
    dm = TwoClassDigits()
    dm.setup("test")
    predicted, truth = predictions(model, dm.test_dataloader())
    assert set(predicted) <= {0, 1}
    assert float(trainer.callback_metrics["test/recall/macro"]) == pytest.approx(
        recall_score(truth, predicted, average="macro"), abs=1e-6
    )
    assert metrics.history[-1]["macro"]["recall"] == pytest.approx(float(trainer.callback_metrics["test/recall/macro"]))


class OneShardOfDigits(StructuredDigits):
    """Validates on one rank's shard of a padded DistributedSampler, as each DDP process does."""

    def __init__(self, shuffle_val):
        super().__init__(batch_size=2, val_size=9)
        self.shuffle_val = shuffle_val

    def val_dataloader(self):
        sampler = DistributedSampler(self.val_set, num_replicas=2, rank=1, shuffle=self.shuffle_val)
        return DataLoader(self.val_set, sampler=sampler, batch_size=2)


@pytest.mark.parametrize("shuffle_val", [False, True])
def test_padding_is_left_out_even_when_a_batch_holds_nothing_else(shuffle_val):
    # Rank 1 of 2 over 9 samples gets positions 1, 3, 5, 7 and the padding position 9, alone in its batch.
    metrics = PerClassMetrics(num_classes=10)
    trainer = Trainer(**trainer_kwargs(callbacks=[metrics], limit_train_batches=2))
    trainer.fit(RecordingClassifier(), datamodule=RobustDataModule(OneShardOfDigits(shuffle_val)))
    assert sum(metrics.last("val")["support"]) == 4


def _alerts_of(poison, epochs, **kwargs):
    seed_everything(0)
    metrics = PerClassMetrics(num_classes=10, **kwargs)
    trainer = Trainer(**trainer_kwargs(max_epochs=epochs, callbacks=[metrics]))
    trainer.fit(SmallCNN(), datamodule=RobustDataModule(DigitsDataModule(), poison=poison))
    return metrics, trainer


def test_a_targeted_flip_raises_alerts_that_name_its_classes():
    with pytest.warns(ClassAlert, match=r"class '(4|8)'"):
        metrics, trainer = _alerts_of(PairFlip({4: 8}, rate=0.6), epochs=12, warmup_epochs=4)
    alerts = [alert for record in metrics.history for alert in record.get("alerts", [])]
    named = {alert.split("'")[1] for alert in alerts}
    assert {"4", "8"} <= named, alerts
    assert any("of the predictions but holds" in alert for alert in alerts)
    assert float(trainer.callback_metrics["val/alerts"]) == len(metrics.history[-1]["alerts"])


def test_a_validation_before_fit_neither_shortens_the_warm_up_nor_sets_a_best():
    seed_everything(0)
    # Margins so tight that any judged epoch of a model one epoch into training alerts.
    metrics = PerClassMetrics(num_classes=10, warmup_epochs=1, share_margin=0.01, alert_margin=0.01, min_count=1)
    trainer = Trainer(**trainer_kwargs(max_epochs=2, callbacks=[metrics]))
    model, data = SmallCNN(), RobustDataModule(DigitsDataModule())
    trainer.validate(model, datamodule=data, verbose=False)
    trainer.fit(model, datamodule=data)
    baseline, first, second = metrics.history
    assert not baseline["fitting"] and first["fitting"] and second["fitting"]
    assert first["alerts"] == [], "the first fit epoch is still the warm-up: the baseline does not count"
    assert second["alerts"], "the second is judged against the first"


def test_the_warm_up_counts_epochs_when_each_epoch_validates_twice():
    seed_everything(0)
    metrics = PerClassMetrics(num_classes=10, warmup_epochs=1, share_margin=0.01, alert_margin=0.01, min_count=1)
    trainer = Trainer(**trainer_kwargs(max_epochs=2, val_check_interval=0.5, callbacks=[metrics]))
    trainer.fit(SmallCNN(), datamodule=RobustDataModule(DigitsDataModule()))
    assert [r["epoch"] for r in metrics.history] == [0, 0, 1, 1]
    assert [bool(r["alerts"]) for r in metrics.history] == [False, False, True, True], "judged from epoch 1 on"


def test_a_clean_run_stays_nearly_silent_and_alerts_can_be_turned_off():
    metrics, _ = _alerts_of(None, epochs=20, warmup_epochs=5)
    assert sum(len(record["alerts"]) for record in metrics.history) <= 2
    metrics, _ = _alerts_of(PairFlip({4: 8}, rate=0.6), epochs=6, warmup_epochs=2, alert_margin=None, share_margin=None)
    assert all(record["alerts"] == [] for record in metrics.history)
    with pytest.raises(ValueError, match="share_margin must lie in"):
        PerClassMetrics(num_classes=10, share_margin=0)
