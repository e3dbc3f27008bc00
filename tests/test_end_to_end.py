"""Everything at once, on one process and on two: the same decisions and state, and runs that resume exactly."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from helpers import trainer_kwargs
from lightning.pytorch import Callback, Trainer, seed_everything
from lightning.pytorch.callbacks import ModelCheckpoint

from robust_lightning import RobustDataModule
from robust_lightning.callbacks import (
    AdversarialTraining,
    DriftMonitor,
    EMAWeights,
    Mixup,
    PerClassMetrics,
    PoisonFilter,
    PseudoLabels,
    RobustEvaluation,
    RobustLoss,
)
from robust_lightning.callbacks.criterion_swap import CriterionSwap
from robust_lightning.data import DigitsDataModule
from robust_lightning.losses import ELRLoss
from robust_lightning.models import SmallCNN
from robust_lightning.poison import PairFlip

FLIPS = {4: 8, 8: 4, 6: 9, 9: 6}


class DumpState(Callback):
    """Each rank's weights, exclusion mask, ELR targets, filter flags, metric and drift histories at the end of fit."""

    def __init__(self, folder: str) -> None:
        self.folder = folder

    def on_fit_end(self, trainer, pl_module):
        def first(kind):
            return next(c for c in trainer.callbacks if type(c) is kind)

        elr = CriterionSwap.of(pl_module).replacement
        weights = b"".join(p.detach().cpu().numpy().tobytes() for p in pl_module.parameters())
        robust = [c for c in trainer.callbacks if type(c) is RobustEvaluation]
        record = {
            "weights": hashlib.sha256(weights).hexdigest(),
            "robust": robust[0].history if robust else None,
            "excluded": RobustDataModule.from_trainer(trainer).excluded.tolist(),
            "elr": [round(v, 5) for v in elr.ema_targets.flatten().tolist()],
            "flags": first(PoisonFilter).flags.tolist(),
            "rounds": first(PoisonFilter).rounds,
            "history": first(PerClassMetrics).history,
            "drift": first(DriftMonitor).history,
            "epochs": trainer.current_epoch,
        }
        Path(self.folder, f"state{trainer.global_rank}.json").write_text(json.dumps(record))


class StopAfter(Callback):
    def __init__(self, epoch: int) -> None:
        self.epoch = epoch

    def on_train_epoch_end(self, trainer, pl_module):
        if trainer.current_epoch == self.epoch:
            trainer.should_stop = True


def run(folder: Path, devices=1, attack=True, stop_after=None, resume=None, epochs=10, random_draws=False):
    """The default recipe's pieces and more: a pair-flip drill, the filter, ELR, FGSM-RS, metrics and drift.

    ``random_draws`` adds the other callbacks that draw random numbers every batch (Mixup, a robust
    evaluation with PGD's random start, pseudo-labels on the excluded samples) and a weight average.
    """
    seed_everything(0)
    folder.mkdir(parents=True, exist_ok=True)
    callbacks = [
        PerClassMetrics(num_classes=10),
        DriftMonitor(every_n_epochs=2, permutations=200),
        PoisonFilter(start_epoch=2, every_n_epochs=2, dirpath=folder),
        *([AdversarialTraining("fgsm_rs", eps=0.1)] if attack else []),
        *([Mixup(), RobustEvaluation(num_classes=10, steps=2), PseudoLabels()] if random_draws else []),
        *([EMAWeights(decay=0.99)] if random_draws else []),
        RobustLoss(ELRLoss(num_classes=10)),
        ModelCheckpoint(dirpath=folder, save_last=True),
        DumpState(str(folder)),
        *([StopAfter(stop_after)] if stop_after is not None else []),
    ]
    strategy = {"strategy": "ddp_spawn"} if devices > 1 else {}
    settings = {"max_epochs": epochs, "devices": devices, "enable_checkpointing": True, "default_root_dir": folder}
    trainer = Trainer(**trainer_kwargs(**settings, **strategy), callbacks=callbacks)
    # The same global batch of 64 on every run: 32 per rank on two ranks.
    data = RobustDataModule(DigitsDataModule(batch_size=64 // devices), poison=PairFlip(FLIPS, rate=0.4))
    model = SmallCNN()
    trainer.fit(model, datamodule=data, ckpt_path=resume)
    states = [json.loads((folder / f"state{rank}.json").read_text()) for rank in range(devices)]
    return trainer, model, data, states


@pytest.mark.slow
def test_two_processes_take_the_same_decisions_and_reach_the_accuracy_of_one(tmp_path):
    _, single_model, single_data, (one,) = run(tmp_path / "one")
    _, ddp_model, ddp_data, (rank0, rank1) = run(tmp_path / "two", devices=2)
    assert rank0 == rank1, "identical masks, ELR targets, filter rounds, synced metrics and drift results on both ranks"
    assert sum(rank0["excluded"]) > 150 and rank0["excluded"] == rank0["flags"]
    assert rank0["epochs"] == one["epochs"] == 10, "the filter's head restart keeps both runs' length"
    test = Trainer(**trainer_kwargs())
    single_acc = test.test(single_model, datamodule=single_data, verbose=False)[0]["test/acc"]
    ddp_acc = test.test(ddp_model, datamodule=ddp_data, verbose=False)[0]["test/acc"]
    # Not bit-identical runs: DDP sums gradients in another order, and 10 chaotic epochs amplify that (without the
    # attack the filters' masks end 23 of about 280 samples apart, accuracy 81.7% against 84.4%), as running on 1
    # or 2 threads does. The bound is that noise, not a target.
    assert abs(single_acc - ddp_acc) <= 0.04, (single_acc, ddp_acc)
    # 10 epochs of a 40% pair flip under FGSM-RS end between 78% and 85% over seeds 0-3: a floor, not a target.
    assert ddp_acc > 0.75


def resumes_exactly(tmp_path, devices):
    """Random starts and mixing draws included: they come from per-batch seeds, not the global RNG."""
    _, _, _, whole = run(tmp_path / "whole", devices=devices, random_draws=True)
    run(tmp_path / "killed", devices=devices, stop_after=5, random_draws=True)
    checkpoint = tmp_path / "killed" / "last.ckpt"
    assert torch.load(checkpoint, weights_only=False)["epoch"] == 5
    _, _, _, resumed = run(tmp_path / "resumed", devices=devices, resume=checkpoint, random_draws=True)
    for key in ("weights", "excluded", "elr", "flags", "rounds", "history", "robust", "drift", "epochs"):
        assert resumed[0][key] == whole[0][key], key


@pytest.mark.slow
def test_a_killed_run_resumes_to_the_same_state_as_an_uninterrupted_one(tmp_path):
    resumes_exactly(tmp_path, devices=1)


@pytest.mark.slow
def test_a_killed_two_process_run_resumes_to_the_same_state(tmp_path):
    resumes_exactly(tmp_path, devices=2)
