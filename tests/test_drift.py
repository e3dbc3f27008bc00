"""Drift tests on tensors, and DriftMonitor in real training on the digits."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import trainer_kwargs
from lightning.pytorch import Callback, Trainer, seed_everything
from torch.utils.data import DataLoader, TensorDataset

from robust_lightning import RobustDataModule
from robust_lightning.callbacks import DriftMonitor
from robust_lightning.data import DigitsDataModule
from robust_lightning.metrics import chi2_test, drift_tests, ks_test, mmd_test, random_projection
from robust_lightning.models import SmallCNN


def _sample(generator, n=150, shift=0.0):
    features = torch.randn(n, 6, generator=generator) + shift
    labels = torch.randint(0, 4, (n,), generator=generator)
    return {"features": features, "labels": labels, "logits": features[:, :4], "inputs": features.unsqueeze(1)}


def test_the_family_of_tests_holds_its_level_on_samples_from_one_distribution():
    generator = torch.Generator().manual_seed(0)
    alarms = [
        drift_tests(_sample(generator), _sample(generator), 4, 0.05, permutations=200, generator=generator).drift
        for _ in range(60)
    ]
    assert sum(alarms) <= 6, "Bonferroni over the five tests keeps false alarms near or below alpha (5% of 60 = 3)"


def test_each_test_sees_the_shift_it_is_made_for():
    g = torch.Generator().manual_seed(1)
    reference = torch.randn(200, 5, generator=g)
    assert ks_test(reference, torch.randn(200, 5, generator=g) + 0.5).p_value < 1e-3, "a shifted location"
    assert mmd_test(reference, torch.randn(200, 5, generator=g) + 0.4, 500, g).p_value < 0.01, "a shifted mean"
    assert chi2_test(torch.tensor([0, 1, 2] * 60), torch.tensor([0] * 120 + [1, 2] * 30), 3).p_value < 1e-6
    projection = random_projection(5, 3, seed=7)
    assert torch.equal(projection, random_projection(5, 3, seed=7)) and projection.shape == (5, 3)


@pytest.mark.parametrize(
    ("reference", "current", "message"),
    [
        (torch.randn(10, 3), torch.randn(10, 4), "same features"),
        (torch.randn(1, 3), torch.randn(10, 3), "at least 2 samples"),
        (torch.randn(10, 3), torch.full((10, 3), float("nan")), "NaN or inf"),
    ],
)
def test_bad_samples_are_refused(reference, current, message):
    with pytest.raises(ValueError, match=message):
        ks_test(reference, current)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"alpha": 0}, "alpha must lie in"),
        ({"permutations": 0}, "permutations must be a positive integer"),
        ({"reference_size": -5}, "reference_size must be a positive integer"),
        ({"dataloaders": {"val": []}}, "give your loader another name"),
    ],
)
def test_bad_arguments_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        DriftMonitor(**kwargs)


def _noisy_val(sigma=0.1):
    digits = DigitsDataModule()
    digits.setup("fit")
    x, y = digits.val_set.tensors
    return DataLoader(TensorDataset(x + sigma * torch.randn(x.shape, generator=torch.Generator().manual_seed(0)), y))


def test_noisy_validation_data_is_flagged_and_iid_data_is_not(tmp_path):
    seed_everything(0)
    monitor = DriftMonitor(every_n_epochs=5, dataloaders={"noisy": _noisy_val()}, permutations=300)
    trainer = Trainer(**trainer_kwargs(max_epochs=10, callbacks=[monitor]))
    model = SmallCNN()
    trainer.fit(model, datamodule=RobustDataModule(DigitsDataModule()))
    assert [(r["epoch"], r["name"]) for r in monitor.history] == [(4, "val"), (4, "noisy"), (9, "val"), (9, "noisy")]
    last = {r["name"]: r for r in monitor.history[-2:]}
    assert last["noisy"]["drift"] and last["noisy"]["p"] < 0.01
    assert not last["val"]["drift"]
    assert trainer.callback_metrics["drift/noisy/flag"] == 1 and trainer.callback_metrics["drift/val/flag"] == 0
    # Testing after fit compares the test set with the same training sample.
    trainer.test(model, datamodule=RobustDataModule(DigitsDataModule()), verbose=False)
    assert monitor.history[-1]["name"] == "test" and not monitor.history[-1]["drift"]


def test_history_is_saved_in_checkpoints_and_test_without_fit_reads_the_train_split(tmp_path):
    monitor = DriftMonitor(every_n_epochs=1, permutations=50)
    trainer = Trainer(
        **trainer_kwargs(max_epochs=1, callbacks=[monitor], enable_checkpointing=True, default_root_dir=tmp_path)
    )
    trainer.fit(SmallCNN(), datamodule=DigitsDataModule())
    checkpoint = torch.load(next(tmp_path.rglob("*.ckpt")), weights_only=False)
    assert checkpoint["callbacks"][monitor.state_key]["history"] == monitor.history
    fresh = DriftMonitor(every_n_epochs=1, permutations=50)
    Trainer(**trainer_kwargs(callbacks=[fresh])).test(SmallCNN(), datamodule=DigitsDataModule(), verbose=False)
    assert fresh.history[-1]["name"] == "test" and not fresh.history[-1]["drift"]
    digits = DigitsDataModule()
    digits.setup("test")
    with pytest.raises(RuntimeError, match="Pass reference=DataLoader"):
        Trainer(**trainer_kwargs(callbacks=[DriftMonitor()])).test(
            SmallCNN(), dataloaders=DataLoader(digits.test_set), verbose=False
        )
    digits = DigitsDataModule()
    digits.setup("fit")
    given = DriftMonitor(reference=DataLoader(digits.train_set, batch_size=128), permutations=50)
    Trainer(**trainer_kwargs(callbacks=[given])).test(SmallCNN(), datamodule=DigitsDataModule(), verbose=False)
    assert given.history[-1]["name"] == "test"


class DumpDrift(Callback):
    def __init__(self, folder):
        self.folder = folder

    def on_fit_end(self, trainer, pl_module):
        monitor = next(c for c in trainer.callbacks if isinstance(c, DriftMonitor))
        Path(self.folder, f"drift{trainer.global_rank}.json").write_text(json.dumps(monitor.history))


@pytest.mark.slow
def test_under_ddp_every_rank_reaches_the_same_result(tmp_path):
    monitor = DriftMonitor(every_n_epochs=1, dataloaders={"noisy": _noisy_val()}, permutations=200)
    trainer = Trainer(
        **trainer_kwargs(max_epochs=2, devices=2, strategy="ddp_spawn", callbacks=[monitor, DumpDrift(str(tmp_path))])
    )
    trainer.fit(SmallCNN(), datamodule=RobustDataModule(DigitsDataModule()))
    histories = [json.loads((tmp_path / f"drift{rank}.json").read_text()) for rank in range(2)]
    assert histories[0] == histories[1] and len(histories[0]) == 4
    assert float(trainer.callback_metrics["drift/noisy/flag"]) == 1.0 and histories[0][-1]["drift"]
    assert float(trainer.callback_metrics["drift/val/p"]) == pytest.approx(histories[0][-2]["p"])
