"""PoisonFilter in real Lightning training on the digits."""

import csv
import json
from pathlib import Path

import pytest
import torch
from helpers import StructuredDigits, split_batch, trainer_kwargs
from lightning.pytorch import Callback, LightningDataModule, LightningModule, Trainer, seed_everything
from lightning.pytorch.callbacks import EarlyStopping, WeightAveraging
from torch.utils.data import DataLoader, TensorDataset

from robust_lightning import RobustDataModule
from robust_lightning.callbacks import PoisonFilter
from robust_lightning.callbacks.criterion_swap import CriterionSwap, Reweight
from robust_lightning.callbacks.signals import MAX_INPUT_DIMS
from robust_lightning.data import DigitsDataModule
from robust_lightning.detectors import Ensemble, InputSpectralSignatures, KNNLabelConsistency
from robust_lightning.models import SmallCNN
from robust_lightning.poison import BackdoorTrigger, PairFlip

FLIPS = {4: 8, 8: 4, 6: 9, 9: 6}
HEAD = ("features.6", "head")  # SmallCNN's classifier head: Linear(256, 64), ReLU, Linear(64, 10)


def fit_with_filter(tmp_path, filter_, epochs=6, callbacks=(), **kwargs):
    seed_everything(0)
    data = RobustDataModule(DigitsDataModule(), poison=PairFlip(FLIPS, rate=0.4))
    trainer = Trainer(
        **trainer_kwargs(max_epochs=epochs, **kwargs), callbacks=[filter_, *callbacks], default_root_dir=tmp_path
    )
    model = SmallCNN()
    trainer.fit(model, datamodule=data)
    return trainer, data, model


class InitialWeights(Callback):
    """Records the weights at the start of fit, and at the start of each epoch (after the filter's hook)."""

    def __init__(self):
        self.at_start = {}

    def on_fit_start(self, trainer, pl_module):
        self.initial = {k: v.clone() for k, v in pl_module.state_dict().items()}

    def on_train_epoch_start(self, trainer, pl_module):
        self.at_start[trainer.current_epoch + 1] = {k: v.clone() for k, v in pl_module.state_dict().items()}


def test_the_filter_screens_restarts_the_model_confirms_and_reports(tmp_path):
    filter_ = PoisonFilter(start_epoch=5, every_n_epochs=5, dirpath=tmp_path, restart="model")
    weights = InitialWeights()
    trainer, data, _ = fit_with_filter(tmp_path, filter_, epochs=10, callbacks=[weights])
    screen, *confirm = filter_.rounds
    assert (screen["epoch"], screen["restarted"]) == (5, True) and screen["recall"] >= 0.98
    assert [r["epoch"] for r in confirm] == [10, 15] and not any(r["restarted"] for r in confirm)
    assert trainer.current_epoch == 15 and filter_.extended_by == 5, "10 epochs after the restart"
    restarted, before = weights.at_start[6], weights.at_start[5]
    assert all(torch.equal(restarted[k], weights.initial[k]) for k in restarted), "epoch 6 starts from the start"
    assert not all(torch.equal(before[k], weights.initial[k]) for k in before)
    last = confirm[-1]
    assert last["f1"] >= 0.85 and last["recall"] >= 0.95, last
    assert last["flagged"] < screen["flagged"], "the confirming rounds give the screen's false alarms back"
    assert torch.equal(data.excluded, filter_.flags)
    logged = trainer.callback_metrics
    assert float(logged["filter/flagged"]) == last["flagged"] == int(filter_.flags.sum())
    assert float(logged["filter/f1"]) == pytest.approx(last["f1"])
    per_class = [float(logged[f"filter/flagged/{c}"]) for c in range(10)]
    assert sum(per_class) == last["flagged"]
    assert max(per_class[c] for c in (0, 1, 2, 3, 5, 7)) < min(per_class[c] for c in FLIPS)
    rows = list(csv.DictReader((tmp_path / "flagged.csv").read_text().splitlines()))
    assert [int(r["id"]) for r in rows] == filter_.flags.nonzero().flatten().tolist()
    names = {"spectral", "knn", "input_spectral", "reclassification"}
    assert {r["detector"] for r in rows} and all(set(r["detector"].split("+")) <= names for r in rows)
    labels = torch.tensor([int(data._train[int(r["id"])][0][1]) for r in rows])
    assert [int(r["label"]) for r in rows] == labels.tolist(), "the label given to the model, poisoned or not"


class HeadAtRestart(Callback):
    """Records the parameters at the end of each epoch and at the start of the next (after the filter's hook),
    and which of them Adam holds moments for."""

    def __init__(self):
        self.ends, self.starts, self.moments = {}, {}, {}

    def on_fit_start(self, trainer, pl_module):
        self.initial = {k: v.detach().clone() for k, v in pl_module.named_parameters()}

    def on_train_epoch_end(self, trainer, pl_module):
        self.ends[trainer.current_epoch + 1] = {k: v.detach().clone() for k, v in pl_module.named_parameters()}

    def on_train_epoch_start(self, trainer, pl_module):
        epoch, state = trainer.current_epoch + 1, trainer.optimizers[0].state
        self.starts[epoch] = {k: v.detach().clone() for k, v in pl_module.named_parameters()}
        self.moments[epoch] = {k: p in state for k, p in pl_module.named_parameters()}


def test_a_head_restart_puts_back_the_head_alone_and_keeps_the_runs_length(tmp_path):
    filter_, record = PoisonFilter(start_epoch=3, every_n_epochs=3, dirpath=tmp_path), HeadAtRestart()
    trainer, data, _ = fit_with_filter(tmp_path, filter_, epochs=9, callbacks=[record])
    assert [r["epoch"] for r in filter_.rounds] == [3, 6, 9] and filter_.rounds[0]["restarted"]
    assert trainer.current_epoch == 9 and filter_.extended_by == 0, "the run keeps its length"
    restarted, head = record.starts[4], lambda key: key.rpartition(".")[0] in HEAD
    assert {k.rpartition(".")[0] for k in restarted if head(k)} == set(HEAD)
    for key, value in restarted.items():
        assert torch.equal(value, record.initial[key] if head(key) else record.ends[3][key]), key
        assert record.moments[3][key] and not record.moments[4][key], "Adam's moments are forgotten"
    assert filter_.rounds[-1]["recall"] >= 0.95 and filter_.rounds[-1]["f1"] >= 0.85
    assert torch.equal(data.excluded, filter_.flags)


def test_report_only_flags_without_excluding(tmp_path):
    filter_ = PoisonFilter(start_epoch=3, every_n_epochs=0, action="report", dirpath=tmp_path)
    _, data, _ = fit_with_filter(tmp_path, filter_, epochs=3)
    assert filter_.flags.any() and not data.excluded.any()


class DictClassifier(LightningModule):
    """A user's module on dict batches, whose loss is a criterion attribute."""

    def __init__(self):
        super().__init__()
        self.net = torch.nn.Sequential(
            torch.nn.Flatten(), torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 10)
        )
        self.criterion = torch.nn.CrossEntropyLoss()
        self.losses = []

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = split_batch(batch)
        logits = self(x)
        loss = self.criterion(logits, y)
        terms = torch.nn.functional.cross_entropy(logits.detach(), y, reduction="none")
        self.losses.append((RobustDataModule.from_trainer(self.trainer).batch_ids.clone(), loss.detach(), terms))
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = split_batch(batch)
        self.log("val_loss", self.criterion(self(x), y))

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-2)


def test_weight_action_reweights_through_the_criterion_and_puts_it_back(tmp_path):
    model = DictClassifier()
    original = model.criterion
    filter_ = PoisonFilter(
        start_epoch=1, every_n_epochs=0, action="weight", weight=0.0, dirpath=tmp_path, restart="model"
    )
    data = RobustDataModule(StructuredDigits("dict"), poison=PairFlip(FLIPS, rate=0.4))
    Trainer(**trainer_kwargs(max_epochs=2, callbacks=[filter_])).fit(model, datamodule=data)
    assert model.criterion is original
    assert filter_.flags.any() and not data.excluded.any()
    for ids, loss, terms in model.losses[-3:]:  # second epoch: flagged samples weigh nothing
        keep = ~filter_.flags[ids]
        assert keep.any() and not keep.all()
        assert float(loss) == pytest.approx(float(terms[keep].mean()), rel=1e-5)


def test_weight_action_explains_what_to_add_to_a_module_without_criterion():
    class NoCriterion(DictClassifier):
        def __init__(self):
            super().__init__()
            del self.criterion

    with pytest.raises(AttributeError, match=r"self.criterion = nn.CrossEntropyLoss\(\)"):
        Trainer(**trainer_kwargs(callbacks=[PoisonFilter(action="weight")])).fit(
            NoCriterion(), datamodule=RobustDataModule(StructuredDigits())
        )


def test_the_criterion_comes_back_when_fit_fails(tmp_path):
    class Boom(Callback):
        def on_train_batch_end(self, *args):
            raise RuntimeError("boom")

    model = DictClassifier()
    original = model.criterion
    trainer = Trainer(**trainer_kwargs(callbacks=[PoisonFilter(action="weight", dirpath=tmp_path), Boom()]))
    with pytest.raises(RuntimeError, match="boom"):
        trainer.fit(model, datamodule=RobustDataModule(StructuredDigits("dict")))
    assert model.criterion is original


def test_the_filter_needs_robust_data_module_and_says_so():
    with pytest.raises(TypeError, match="PoisonFilter needs sample ids, which come from RobustDataModule"):
        Trainer(**trainer_kwargs(callbacks=[PoisonFilter()])).fit(SmallCNN(), datamodule=DigitsDataModule())


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"action": "delete"}, "action must be one of"),
        ({"start_epoch": 0}, "start_epoch"),
        ({"every_n_epochs": -1}, "every_n_epochs"),
        ({"weight": 1.5}, "weight must lie"),
        ({"detectors": ["spectrall"]}, "Unknown detector"),
        ({"rule": "most"}, "rule must be one of"),
        ({"restart": True}, "restart must be 'head', 'model' or None, got True.*what restart=True did"),
        ({"restart": "all"}, "restart must be 'head', 'model' or None"),
    ],
)
def test_nonsensical_settings_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        PoisonFilter(**kwargs)


class StepAtRestart(Callback):
    """Listed after the average: sees it as the restart left it."""

    def on_model_restart(self, trainer):
        self.step = trainer.global_step
        average = next(c for c in trainer.callbacks if isinstance(c, WeightAveraging))._average_model.module
        restarted = trainer.lightning_module.state_dict()
        self.average_is_the_restarted_model = all(torch.equal(v, restarted[k]) for k, v in average.state_dict().items())


def test_a_weight_average_starts_again_with_the_restarted_model(tmp_path):
    average, restart = WeightAveraging(), StepAtRestart()  # an equal average of the weights after every step
    filter_ = PoisonFilter(start_epoch=2, every_n_epochs=0, dirpath=tmp_path)
    trainer, _, _ = fit_with_filter(tmp_path, filter_, epochs=3, callbacks=[average, restart])
    assert 0 < restart.step < trainer.global_step
    assert int(average._average_model.n_averaged) == trainer.global_step - restart.step, "no step of the old model"
    assert restart.average_is_the_restarted_model, "until its next update too (an epoch away if updated per epoch)"


def test_a_resumed_run_gets_the_filter_state_and_the_extension_back(tmp_path):
    filter_ = PoisonFilter(start_epoch=2, every_n_epochs=0, dirpath=tmp_path, restart="model")
    trainer, data, _ = fit_with_filter(tmp_path, filter_, epochs=3)
    assert [r["epoch"] for r in filter_.rounds] == [2, 4] and trainer.current_epoch == 5
    trainer.save_checkpoint(tmp_path / "done.ckpt")
    resumed = PoisonFilter(start_epoch=2, every_n_epochs=0, dirpath=tmp_path, restart="model")
    data2 = RobustDataModule(DigitsDataModule(), poison=PairFlip(FLIPS, rate=0.4))
    again = Trainer(**trainer_kwargs(max_epochs=3), callbacks=[resumed])
    again.fit(SmallCNN(), datamodule=data2, ckpt_path=tmp_path / "done.ckpt")
    assert again.current_epoch == 5, "the extension is part of the resumed run too: nothing left to train"
    assert torch.equal(resumed.flags, filter_.flags) and resumed.rounds == filter_.rounds
    assert resumed.extended_by == 2 and torch.equal(resumed._signals.margin_sum, filter_._signals.margin_sum)
    assert torch.equal(data2.excluded, data.excluded)


@pytest.mark.parametrize("restart, kept", [("model", "model"), ("head", "head")])
def test_a_checkpoint_taken_before_the_restart_keeps_the_initial_weights(tmp_path, restart, kept):
    filter_ = PoisonFilter(start_epoch=3, every_n_epochs=0, dirpath=tmp_path, restart=restart)
    trainer, _, model = fit_with_filter(tmp_path, filter_, epochs=1)
    assert not filter_.rounds
    trainer.save_checkpoint(tmp_path / "early.ckpt")
    initial = torch.load(tmp_path / "early.ckpt", weights_only=False)["callbacks"][filter_.state_key]["initial"]
    expected = set(model.state_dict()) if restart == "model" else {f"{n}.{p}" for n in HEAD for p in ("weight", "bias")}
    assert set(initial[kept]) == expected


def test_a_run_saved_before_its_restart_resumes_only_with_the_restart_it_planned(tmp_path):
    filter_ = PoisonFilter(start_epoch=3, every_n_epochs=0, dirpath=tmp_path, restart="model")
    trainer, _, _ = fit_with_filter(tmp_path, filter_, epochs=1)
    trainer.save_checkpoint(tmp_path / "early.ckpt")
    data = RobustDataModule(DigitsDataModule(), poison=PairFlip(FLIPS, rate=0.4))
    again = Trainer(**trainer_kwargs(max_epochs=2), callbacks=[PoisonFilter(start_epoch=3, dirpath=tmp_path)])
    with pytest.raises(ValueError, match=r"saved by PoisonFilter\(restart='model'\).*Resume with"):
        again.fit(SmallCNN(), datamodule=data, ckpt_path=tmp_path / "early.ckpt")


class DumpFilter(Callback):
    def __init__(self, folder):
        self.folder = folder

    def on_fit_end(self, trainer, pl_module):
        filter_ = next(c for c in trainer.callbacks if isinstance(c, PoisonFilter))
        record = {
            "flags": filter_.flags.nonzero().flatten().tolist(),
            "excluded": RobustDataModule.from_trainer(trainer).excluded_ids.tolist(),
            "rounds": filter_.rounds,
        }
        Path(self.folder, f"filter{trainer.global_rank}.json").write_text(json.dumps(record))


@pytest.mark.slow
def test_ddp_ranks_take_the_same_decision_from_gathered_statistics(tmp_path):
    # flagged.csv into default_root_dir: a collective
    filter_ = PoisonFilter(start_epoch=3, every_n_epochs=0, restart="model")
    data = RobustDataModule(DigitsDataModule(), poison=PairFlip(FLIPS, rate=0.4))
    trainer = Trainer(
        **trainer_kwargs(max_epochs=3, devices=2, strategy="ddp_spawn", default_root_dir=tmp_path),
        callbacks=[filter_, DumpFilter(str(tmp_path))],
    )
    trainer.fit(SmallCNN(), datamodule=data)
    ranks = [json.loads((tmp_path / f"filter{r}.json").read_text()) for r in range(2)]
    assert ranks[0] == ranks[1]
    assert [r["epoch"] for r in ranks[0]["rounds"]] == [3, 6], "screen, restart, confirm: the same on both ranks"
    assert ranks[0]["flags"] == ranks[0]["excluded"] and ranks[0]["rounds"][-1]["f1"] > 0.6
    assert len((tmp_path / "flagged.csv").read_text().splitlines()) == 1 + len(ranks[0]["flags"])


class Blobs(LightningDataModule):
    """100k synthetic samples of 64 values in 10 classes, with a trusted validation split."""

    num_classes = 10

    def setup(self, stage: str) -> None:
        g = torch.Generator().manual_seed(0)
        centres = torch.randn(10, 64, generator=g)
        labels = torch.randint(0, 10, (102_000,), generator=g)
        inputs = centres[labels] + torch.randn(102_000, 64, generator=g)
        self.train_set = TensorDataset(inputs[:100_000], labels[:100_000])
        self.val_set = TensorDataset(inputs[100_000:], labels[100_000:])

    def train_dataloader(self):
        return DataLoader(self.train_set, batch_size=500, shuffle=True)

    def val_dataloader(self):
        return DataLoader(self.val_set, batch_size=1000)


@pytest.mark.slow
def test_ddp_ranks_take_the_same_decision_at_100k_samples(tmp_path):
    """Each rank reads its share of the signals, and one sum per buffer makes them whole and identical everywhere."""
    filter_ = PoisonFilter(start_epoch=1, every_n_epochs=0, restart=None)
    data = RobustDataModule(Blobs(), poison=PairFlip(FLIPS, rate=0.4), validate=False)
    trainer = Trainer(
        **trainer_kwargs(max_epochs=1, devices=2, strategy="ddp_spawn", default_root_dir=tmp_path),
        callbacks=[filter_, DumpFilter(str(tmp_path))],
    )
    trainer.fit(DictClassifier(), datamodule=data)
    ranks = [json.loads((tmp_path / f"filter{r}.json").read_text()) for r in range(2)]
    assert ranks[0] == ranks[1]
    assert ranks[0]["flags"] == ranks[0]["excluded"] and ranks[0]["rounds"][-1]["recall"] > 0.9, ranks[0]["rounds"]


@pytest.mark.parametrize(
    "loss",
    [
        torch.nn.CrossEntropyLoss(),
        torch.nn.CrossEntropyLoss(weight=torch.linspace(0.5, 2.0, 10), ignore_index=3),
        torch.nn.CrossEntropyLoss(reduction="sum"),
        torch.nn.NLLLoss(weight=torch.linspace(2.0, 0.5, 10)),
        torch.nn.KLDivLoss(reduction="batchmean"),
    ],
)
def test_unit_weights_give_back_the_loss_exactly_and_weights_reweight_each_sample(loss):
    module = DictClassifier()
    module.criterion = loss
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(12, 10, generator=g).log_softmax(1)
    target = torch.randint(0, 10, (12,), generator=g)
    if isinstance(loss, torch.nn.KLDivLoss):
        target = torch.randn(12, 10, generator=g).softmax(1)
    expected, first_four = loss(logits, target), loss(logits[:4], target[:4])
    weights = {"now": torch.ones(12)}
    swap = CriterionSwap.of(module, by="test")
    reweight = Reweight(swap, lambda n: weights["now"])
    swap.add(reweight)
    assert torch.allclose(module.criterion(logits, target), expected)
    weights["now"] = (torch.arange(12) < 4).float()
    assert torch.allclose(module.criterion(logits, target), first_four)
    swap.remove(reweight)
    assert "forward" not in vars(module.criterion) and torch.allclose(module.criterion(logits, target), expected)


def test_weight_action_with_a_class_weighted_loss_restarts_and_checkpoints_cleanly(tmp_path):
    model = DictClassifier()
    model.criterion = torch.nn.CrossEntropyLoss(weight=torch.linspace(0.5, 2.0, 10))
    filter_ = PoisonFilter(start_epoch=1, every_n_epochs=0, action="weight", dirpath=tmp_path, restart="model")
    trainer = Trainer(**trainer_kwargs(max_epochs=1, callbacks=[filter_]))
    trainer.fit(model, datamodule=RobustDataModule(StructuredDigits("dict"), poison=PairFlip(FLIPS, rate=0.4)))
    assert [r["restarted"] for r in filter_.rounds] == [True, False]
    trainer.save_checkpoint(tmp_path / "w.ckpt")
    assert "criterion.weight" in torch.load(tmp_path / "w.ckpt", weights_only=False)["state_dict"]


def test_low_precision_runs_the_inspection_pass_under_the_trainers_precision(tmp_path):
    filter_ = PoisonFilter(start_epoch=1, every_n_epochs=0, dirpath=tmp_path, restart="model")
    fit_with_filter(tmp_path, filter_, epochs=1, precision="bf16-true")
    assert len(filter_.rounds) == 2 and filter_.flags.any()


class TrainOnly(StructuredDigits):
    """A user datamodule with no validation split."""

    val_dataloader = None


class NoValidationStep(DictClassifier):
    """A user module that does not validate: common, and the filter still reads the validation split."""

    validation_step = None


def test_without_a_val_dataloader_the_default_filter_stops_at_setup():
    trainer = Trainer(**trainer_kwargs(max_epochs=3, callbacks=[PoisonFilter()]))
    with pytest.raises(ValueError, match="has no val_dataloader"):
        trainer.fit(DictClassifier(), datamodule=RobustDataModule(TrainOnly(structure="dict")))
    assert trainer.current_epoch == 0, "refused at setup, before any epoch trained"
    filter_ = PoisonFilter(screen=["spectral", "knn"], detectors=["spectral", "knn"], start_epoch=1, every_n_epochs=0)
    Trainer(**trainer_kwargs(callbacks=[filter_])).fit(DictClassifier(), datamodule=RobustDataModule(TrainOnly()))
    assert filter_.rounds


@pytest.mark.parametrize("module", [NoValidationStep, DictClassifier], ids=["no validation_step", "validates"])
def test_the_default_filter_reads_the_validation_split_itself(module, tmp_path):
    """Dict batches, and a module with no validation_step or with validation turned off: the reference is the datamodule's."""
    poison = PairFlip({4: 8, 8: 4}, rate=0.4)
    data = RobustDataModule(StructuredDigits(structure="dict"), poison=poison)
    filter_ = PoisonFilter(start_epoch=3, every_n_epochs=0, dirpath=tmp_path)
    seed_everything(0)
    Trainer(**trainer_kwargs(max_epochs=6, limit_val_batches=0, callbacks=[filter_])).fit(module(), datamodule=data)
    assert [r["epoch"] for r in filter_.rounds] == [3, 6]
    assert filter_.rounds[0]["recall"] >= 0.8, filter_.rounds


def test_a_forward_that_returns_no_logits_gets_a_clear_error(tmp_path):
    class TupleForward(DictClassifier):
        def forward(self, x):
            return self.net(x), x

        def training_step(self, batch, batch_idx):
            x, y = split_batch(batch)
            return self.criterion(self(x)[0], y)

        def validation_step(self, batch, batch_idx):
            pass

    with pytest.raises(TypeError, match="must return a 2-D"):
        Trainer(**trainer_kwargs(callbacks=[PoisonFilter(start_epoch=1, dirpath=tmp_path)])).fit(
            TupleForward(), datamodule=RobustDataModule(StructuredDigits())
        )


class ExcludeOnce(Callback):
    def on_train_epoch_start(self, trainer, pl_module):
        if trainer.current_epoch == 0:
            RobustDataModule.from_trainer(trainer).exclude([7])


def test_the_filter_leaves_other_exclusions_alone_and_early_stopping_starts_afresh(tmp_path):
    stopping = EarlyStopping(monitor="val/acc", mode="max", patience=1)
    filter_ = PoisonFilter(start_epoch=2, every_n_epochs=2, dirpath=tmp_path, restart="model")
    _, data, _ = fit_with_filter(tmp_path, filter_, epochs=4, callbacks=[ExcludeOnce(), stopping])
    # Patience 1 against the old model's best would end the run in the first epoch after the restart.
    assert [r["epoch"] for r in filter_.rounds][:2] == [2, 4], "early stopping cut the restarted run short"
    assert bool(data.excluded[7]), "the user's exclusion survives the filter's rounds"


def test_a_second_fit_with_the_same_callback_starts_afresh(tmp_path):
    filter_ = PoisonFilter(start_epoch=1, every_n_epochs=0, dirpath=tmp_path, restart="model")
    fit_with_filter(tmp_path, filter_, epochs=1)
    trainer, _, _ = fit_with_filter(tmp_path, filter_, epochs=1)
    assert [r["epoch"] for r in filter_.rounds] == [1, 2] and trainer.current_epoch == 2


def test_the_restart_epochs_checkpoint_holds_the_model_its_score_belongs_to(tmp_path):
    from lightning.pytorch.callbacks import ModelCheckpoint

    filter_ = PoisonFilter(start_epoch=2, every_n_epochs=0, dirpath=tmp_path)
    keep = ModelCheckpoint(dirpath=tmp_path, monitor="val/acc", mode="max", save_top_k=-1, filename="{epoch}")
    fit_with_filter(tmp_path, filter_, epochs=2, callbacks=[keep], enable_checkpointing=True)
    restart_epoch = torch.load(tmp_path / "epoch=1.ckpt", weights_only=False)
    model = SmallCNN()
    model.load_state_dict(restart_epoch["state_dict"])
    x, y = _val()
    accuracy = float((model(x).argmax(1) == y).float().mean())
    assert accuracy == pytest.approx(float(keep.best_k_models[str(tmp_path / "epoch=1.ckpt")]), abs=1e-6)


def _val():
    digits = DigitsDataModule()
    digits.setup("fit")
    return digits.val_set.tensors


def test_a_step_bounded_run_gets_back_the_optimizer_steps_spent_before_the_restart(tmp_path):
    filter_ = PoisonFilter(start_epoch=2, every_n_epochs=0, dirpath=tmp_path, restart="model")
    trainer, _, _ = fit_with_filter(tmp_path, filter_, epochs=-1, max_steps=60, accumulate_grad_batches=4)
    assert filter_._extended_steps == 2 * 6 and trainer.max_steps == 60 + 12 and trainer.global_step == 72


def backdoor_fit(tmp_path, restart, seed=0):
    seed_everything(seed)
    drill = BackdoorTrigger(target=0, rate=0.1, seed=seed)
    data = RobustDataModule(DigitsDataModule(), poison=drill, seed=seed)
    filter_ = PoisonFilter(start_epoch=10, every_n_epochs=5, dirpath=tmp_path, restart=restart)
    model = SmallCNN()
    Trainer(**trainer_kwargs(max_epochs=20), callbacks=[filter_]).fit(model, datamodule=data)
    data.setup("test")
    return drill.attack_success_rate(model.eval(), data.datamodule.test_set), filter_


@pytest.mark.parametrize("restart", ["head", None])
def test_excluding_the_triggered_samples_needs_a_restart_to_unlearn_the_backdoor(tmp_path, restart):
    success, filter_ = backdoor_fit(tmp_path, restart)
    assert filter_.rounds[-1]["recall"] >= 0.95, "both find the triggered samples"
    if restart == "head":
        assert success <= 0.08, "a head that never saw them labelled 0 maps the trigger nowhere (seeds 0-3: 0-4%)"
    else:
        assert success >= 0.25, "without a restart the backdoor outlives the exclusion (seeds 0-3: 36-84%)"


class WideDigits(DigitsDataModule):
    """The digits as 3 x 32 x 32 images (3,072 values, wider than PoisonFilter's input projection)."""

    def setup(self, stage):
        super().setup(stage)  # keeps splits made by an earlier call, which are already wide
        for name in ("train_set", "val_set", "test_set"):
            x, y = getattr(self, name).tensors
            if x.shape[1] == 1:
                wide = torch.nn.functional.interpolate(x, scale_factor=4).repeat(1, 3, 1, 1)
                setattr(self, name, torch.utils.data.TensorDataset(wide, y))


def report_round(tmp_path, datamodule, in_channels=1, patch=2, **detectors):
    """One epoch on the BadNets drill (seed 0), then one reporting round of PoisonFilter with ``detectors``."""
    seed_everything(0)
    data = RobustDataModule(datamodule, poison=BackdoorTrigger(target=0, rate=0.1, size=patch, seed=0))
    filter_ = PoisonFilter(**detectors, start_epoch=1, every_n_epochs=0, action="report", dirpath=tmp_path)
    Trainer(**trainer_kwargs(max_epochs=1), callbacks=[filter_]).fit(SmallCNN(in_channels=in_channels), datamodule=data)
    return filter_, data


def test_wide_inputs_are_projected_and_the_stamped_ones_still_found(tmp_path):
    filter_, data = report_round(
        tmp_path,
        WideDigits(),
        in_channels=3,
        patch=8,
        detectors=[InputSpectralSignatures()],
        screen=[InputSpectralSignatures()],
    )
    (projection,) = filter_._signals.tap._projections.values()
    assert projection.shape == (3 * 32 * 32, MAX_INPUT_DIMS)
    assert torch.equal(filter_.flags, data.poison_mask)


def test_an_ensemble_that_holds_the_input_detector_gets_the_inputs(tmp_path):
    detectors = [Ensemble([InputSpectralSignatures(), KNNLabelConsistency()], rule="any")]
    filter_, data = report_round(tmp_path, DigitsDataModule(), detectors=detectors)
    assert filter_.flags[data.poison_mask].all(), "the reporting round uses the detectors, inputs included"
