"""RobustLoss and per-sample losses in real Lightning training on the digits."""

import copy
import json
from pathlib import Path

import pytest
import torch
from helpers import RecordingClassifier, StructuredDigits, split_batch, trainer_kwargs
from lightning.pytorch import Callback, Trainer, seed_everything

from robust_lightning import RobustDataModule
from robust_lightning.callbacks import PoisonFilter, RobustLoss
from robust_lightning.callbacks.criterion_swap import CriterionSwap, Reweight
from robust_lightning.data import DigitsDataModule
from robust_lightning.losses import ELRLoss, ForwardCorrectionLoss, GCELoss, SCELoss
from robust_lightning.models import SmallCNN
from robust_lightning.poison import PairFlip, SymmetricNoise

FLIPS = {4: 8, 8: 4, 6: 9, 9: 6}


class CheckCriterion(Callback):
    """Asserts, at every training batch, that the module's criterion computes ``expected``."""

    def __init__(self, expected):
        self.expected, self.checked = expected, 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        x, y = split_batch(batch)
        with torch.no_grad():
            logits = pl_module(x)
            torch.testing.assert_close(pl_module.criterion(logits, y), self.expected(logits, y))
        self.checked += 1


def test_an_unmodified_module_trains_with_the_robust_loss_and_gets_its_own_back(tmp_path):
    seed_everything(0)
    model, check = SmallCNN(), CheckCriterion(GCELoss(q=0.7))
    trainer = Trainer(**trainer_kwargs(max_epochs=8, callbacks=[RobustLoss("gce"), check], default_root_dir=tmp_path))
    data = RobustDataModule(DigitsDataModule(), validate=False)
    trainer.fit(model, datamodule=data)
    assert check.checked == 8 * 21
    assert type(model.criterion) is torch.nn.CrossEntropyLoss and "forward" not in vars(model.criterion)
    assert trainer.test(model, datamodule=data, verbose=False)[0]["test/acc"] > 0.85


def test_a_failing_fit_gives_the_module_its_loss_back():
    class FailsAtStep3(SmallCNN):
        def training_step(self, batch, batch_idx):
            if batch_idx == 3:
                raise RuntimeError("boom")
            return super().training_step(batch, batch_idx)

    model = FailsAtStep3()
    with pytest.raises(RuntimeError, match="boom"):
        Trainer(**trainer_kwargs(callbacks=[RobustLoss(SCELoss())])).fit(
            model, datamodule=RobustDataModule(DigitsDataModule(), validate=False)
        )
    x, y = torch.randn(4, 10), torch.arange(4)
    assert "forward" not in vars(model.criterion)
    torch.testing.assert_close(model.criterion(x, y), torch.nn.functional.cross_entropy(x, y))


def test_a_module_without_the_loss_attribute_is_told_what_to_add():
    class NoCriterion(SmallCNN):
        def __init__(self):
            super().__init__()
            del self.criterion

        def training_step(self, batch, batch_idx):
            x, y = batch
            return torch.nn.functional.cross_entropy(self(x), y)

    with pytest.raises(AttributeError, match=r"Add `self.criterion = nn.CrossEntropyLoss\(\)`"):
        Trainer(**trainer_kwargs(callbacks=[RobustLoss("gce")])).fit(
            NoCriterion(), datamodule=RobustDataModule(DigitsDataModule(), validate=False)
        )


@pytest.mark.parametrize(("loss", "message"), [("gcee", "Did you mean 'gce'"), ("elr", r"pass RobustLoss\(ELRLoss")])
def test_loss_names_are_checked(loss, message):
    with pytest.raises((ValueError, TypeError), match=message):
        RobustLoss(loss)


def test_elr_without_robust_data_module_names_it():
    digits = DigitsDataModule()
    digits.setup("fit")
    with pytest.raises(TypeError, match=r"ELRLoss, which keeps state per sample, needs sample ids.*RobustDataModule\("):
        Trainer(**trainer_kwargs(callbacks=[RobustLoss(ELRLoss(num_classes=10))])).fit(
            SmallCNN(), train_dataloaders=digits.train_dataloader()
        )


def ema_of(trainer):
    return next(c for c in trainer.callbacks if isinstance(c, RobustLoss)).loss.ema_targets


def fit_elr(tmp_path, epochs, ckpt_path=None, **kwargs):
    seed_everything(0)
    data = RobustDataModule(StructuredDigits("dict"), poison=SymmetricNoise(rate=0.4))
    trainer = Trainer(
        **trainer_kwargs(max_epochs=epochs, default_root_dir=tmp_path, **kwargs),
        callbacks=[RobustLoss(ELRLoss(num_classes=10))],
    )
    model = RecordingClassifier()
    trainer.fit(model, datamodule=data, ckpt_path=ckpt_path)
    return trainer, model, data


def test_elr_keeps_a_target_for_every_training_sample_and_resumes_exactly(tmp_path):
    trainer, model, data = fit_elr(tmp_path / "full", epochs=2)
    ema = ema_of(trainer)
    assert ema.shape == (data.num_train, 10) and (ema.sum(1) > 0).all(), "every sample's target was updated"
    assert "criterion.ema_targets" not in model.state_dict(), "RobustLoss keeps the state out of the module"

    fit_elr(tmp_path / "part", epochs=1, enable_checkpointing=True)
    ckpt = next((tmp_path / "part").rglob("*.ckpt"))
    resumed, resumed_model, _ = fit_elr(tmp_path / "part", epochs=2, ckpt_path=ckpt)
    assert torch.equal(ema_of(resumed), ema)
    for a, b in zip(resumed_model.parameters(), model.parameters(), strict=True):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("precision", ["bf16-true", "64-true"])
@pytest.mark.parametrize("through", ["RobustLoss", "criterion"])
def test_forward_correction_estimates_under_low_and_high_precision(precision, through):
    seed_everything(0)
    loss = ForwardCorrectionLoss(num_classes=10, warmup_epochs=1)
    model = SmallCNN(criterion=loss) if through == "criterion" else SmallCNN()
    callbacks = [RobustLoss(loss)] if through == "RobustLoss" else []
    trainer = Trainer(**trainer_kwargs(max_epochs=2, precision=precision, callbacks=callbacks))
    trainer.fit(model, datamodule=RobustDataModule(DigitsDataModule(), validate=False))
    assert loss.estimated and torch.allclose(loss.transition.float().sum(1), torch.ones(10), atol=1e-2)


def test_one_robust_loss_fitted_twice_starts_each_fit_afresh():
    elr, forward = (
        RobustLoss(ELRLoss(num_classes=10)),
        RobustLoss(ForwardCorrectionLoss(num_classes=10, warmup_epochs=1)),
    )
    for fit in range(2):
        probe = RowsAtEpochStart()
        for robust in (elr, forward):
            seed_everything(fit)
            trainer = Trainer(**trainer_kwargs(max_epochs=2, callbacks=[robust, probe]))
            trainer.fit(SmallCNN(), datamodule=RobustDataModule(DigitsDataModule(), validate=False))
            assert probe.filled[0] == 0, f"fit {fit} began with the previous fit's state"
        assert forward.loss.estimated and forward.loss.first_epoch == 0


def test_a_bound_loss_leaves_the_run_behind_when_copied():
    model = SmallCNN(criterion=ELRLoss(num_classes=10))
    Trainer(**trainer_kwargs()).fit(model, datamodule=RobustDataModule(DigitsDataModule(), validate=False))
    copied = copy.deepcopy(model)
    assert copied.criterion.source is None and torch.equal(copied.criterion.ema_targets, model.criterion.ema_targets)


def test_reweighting_with_class_weights_and_an_ignore_index_beyond_the_classes():
    module = SmallCNN(criterion=torch.nn.CrossEntropyLoss(weight=torch.linspace(0.5, 2.0, 10), ignore_index=255))
    swap = CriterionSwap.of(module)
    swap.add(Reweight(swap, lambda target: torch.ones(len(target))))
    logits, y = torch.randn(6, 10), torch.tensor([1, 255, 3, 255, 9, 0])
    torch.testing.assert_close(
        module.criterion(logits, y),
        torch.nn.functional.cross_entropy(logits, y, weight=torch.linspace(0.5, 2.0, 10), ignore_index=255),
    )


@pytest.mark.parametrize("precision", ["32-true", "bf16-true"])
def test_elr_as_the_modules_own_criterion_gets_its_ids_from_robust_data_module(tmp_path, precision):
    seed_everything(0)
    model = SmallCNN(criterion=ELRLoss(num_classes=10))
    data = RobustDataModule(DigitsDataModule(), validate=False)
    trainer = Trainer(**trainer_kwargs(max_epochs=1, precision=precision))
    trainer.fit(model, datamodule=data)
    assert (model.criterion.ema_targets.float().sum(1) > 0).sum() == data.num_train
    trainer.save_checkpoint(tmp_path / "elr.ckpt")
    reloaded = SmallCNN.load_from_checkpoint(tmp_path / "elr.ckpt", criterion=ELRLoss(num_classes=10))
    assert torch.equal(reloaded.criterion.ema_targets, model.criterion.ema_targets)


class RowsAtEpochStart(Callback):
    """Records, at each epoch start (after the filter's restart), how many per-sample rows the loss has filled."""

    def __init__(self):
        self.filled = {}

    def on_train_epoch_start(self, trainer, pl_module):
        robust = [c.loss for c in trainer.callbacks if isinstance(c, RobustLoss)]
        loss = robust[0] if robust else pl_module.criterion
        buffer = loss.ema_targets if isinstance(loss, ELRLoss) else loss.records
        self.filled[trainer.current_epoch] = int((buffer.sum(1) > 0).sum()) if len(buffer) else "estimated"


@pytest.mark.parametrize("loss", ["elr", "forward"])
@pytest.mark.parametrize("through", ["RobustLoss", "criterion"])
def test_a_filter_restart_starts_the_per_sample_state_afresh_either_way(tmp_path, loss, through):
    make = {
        "elr": lambda: ELRLoss(num_classes=10),
        "forward": lambda: ForwardCorrectionLoss(num_classes=10, warmup_epochs=1),
    }
    seed_everything(0)
    model = SmallCNN() if through == "RobustLoss" else SmallCNN(criterion=make[loss]())
    probe = RowsAtEpochStart()
    callbacks = [PoisonFilter(start_epoch=1, every_n_epochs=0, dirpath=tmp_path), probe]
    if through == "RobustLoss":
        callbacks.insert(1, RobustLoss(make[loss]()))
    data = RobustDataModule(DigitsDataModule(), poison=PairFlip(FLIPS, rate=0.4))
    Trainer(**trainer_kwargs(max_epochs=4, callbacks=callbacks, default_root_dir=tmp_path)).fit(model, datamodule=data)
    assert probe.filled[1] == 0, "the restart of the head at epoch 1 emptied the state with it"
    if loss == "forward":
        assert probe.filled[3] == "estimated", "a warm-up epoch after the restart, then T"
    else:
        assert probe.filled[2] > 0, "filled again by the restarted model"


@pytest.mark.parametrize("replace_first", [True, False])
def test_a_replacement_and_a_reweighting_compose_in_either_order(replace_first):
    model = SmallCNN()
    swap = CriterionSwap.of(model)
    weights = torch.tensor([1.0, 0.0, 2.0, 0.5])
    reweight = Reweight(swap, lambda n: weights)
    steps = [lambda: swap.replace(GCELoss()), lambda: swap.add(reweight)]
    for step in steps if replace_first else steps[::-1]:
        step()
    logits, y = torch.randn(4, 10), torch.tensor([3, 1, 4, 1])
    terms = GCELoss(reduction="none")(logits, y)
    torch.testing.assert_close(model.criterion(logits, y), (terms * weights).sum() / weights.sum())
    swap.remove(reweight)
    torch.testing.assert_close(model.criterion(logits, y), terms.mean())
    swap.remove(swap.replacement)
    assert "forward" not in vars(model.criterion) and not CriterionSwap.of(model).stages


def test_robust_loss_with_the_filters_weight_action_and_a_drill_in_one_run(tmp_path):
    seed_everything(0)
    model = SmallCNN()
    filter_ = PoisonFilter(start_epoch=1, every_n_epochs=1, action="weight", dirpath=tmp_path)
    data = RobustDataModule(DigitsDataModule(), poison=PairFlip(FLIPS, rate=0.4))
    trainer = Trainer(**trainer_kwargs(max_epochs=3, callbacks=[filter_, RobustLoss("gce")], default_root_dir=tmp_path))
    trainer.fit(model, datamodule=data)
    assert filter_.rounds and filter_.flags.any()
    assert "forward" not in vars(model.criterion)


class DumpELR(Callback):
    """Writes each rank's ELR targets, and every rank's targets gathered, for the DDP test."""

    def __init__(self, folder):
        self.folder = folder

    def on_train_end(self, trainer, pl_module):
        ema = ema_of(trainer)
        gathered = trainer.strategy.all_gather(ema)
        record = {
            "same_on_all_ranks": all(torch.equal(gathered[0], g) for g in gathered),
            "rows_updated": int((ema.sum(1) > 0).sum()),
            "num_train": RobustDataModule.from_trainer(trainer).num_train,
            "excluded": RobustDataModule.from_trainer(trainer).excluded_ids.tolist(),
        }
        Path(self.folder, f"elr{trainer.global_rank}.json").write_text(json.dumps(record))


@pytest.mark.slow
def test_elr_with_the_filter_under_two_process_ddp_keeps_one_target_buffer(tmp_path):
    seed_everything(0)
    data = RobustDataModule(DigitsDataModule(), poison=PairFlip(FLIPS, rate=0.4))
    filter_ = PoisonFilter(start_epoch=1, every_n_epochs=1, restart=None, dirpath=tmp_path)  # keeps the targets
    trainer = Trainer(
        **trainer_kwargs(max_epochs=3, devices=2, strategy="ddp_spawn", default_root_dir=tmp_path),
        callbacks=[RobustLoss(ELRLoss(num_classes=10)), filter_, DumpELR(str(tmp_path))],
    )
    trainer.fit(SmallCNN(), datamodule=data)
    ranks = [json.loads((tmp_path / f"elr{r}.json").read_text()) for r in range(2)]
    assert ranks[0] == ranks[1] and ranks[0]["same_on_all_ranks"]
    assert ranks[0]["excluded"], "the filter excluded samples"
    assert ranks[0]["rows_updated"] == ranks[0]["num_train"], "each rank holds the rows the other rank updated"
