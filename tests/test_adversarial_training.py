"""AdversarialTraining in real Lightning training on the digits, with modules that know nothing of it."""

import json
from pathlib import Path

import pytest
import torch
from helpers import StructuredDigits, split_batch, trainer_kwargs
from lightning.pytorch import Callback, LightningModule, Trainer, seed_everything
from torch import nn

from robust_lightning.attacks import InputBounds
from robust_lightning.callbacks import AdversarialTraining, PerClassMetrics, RobustEvaluation
from robust_lightning.data import DigitsDataModule
from robust_lightning.models import SmallCNN

EPS = 0.1


class Classifier(LightningModule):
    """A user's module with BatchNorm, a frozen submodule in eval mode, and a record of what it trained on."""

    def __init__(self, normalize=None):
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, 10))
        self.frozen = nn.Dropout(0.5)
        self.criterion = nn.CrossEntropyLoss()
        self.seen = []

    def on_train_epoch_start(self):
        self.frozen.eval()

    def forward(self, x):
        return self.net(self.frozen(x))

    def training_step(self, batch, batch_idx):
        x, y = split_batch(batch)
        self.seen.append(x.detach().clone())
        return self.criterion(self(x), y)

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-2)


class NormalizedDigits(StructuredDigits):
    """The digits as torchvision's Normalize(mean=0.5, std=0.25) would give them."""

    def setup(self, stage):
        super().setup(stage)
        for split in (self.train_set, self.val_set, self.test_set):
            split.x = (split.x - 0.5) / 0.25


def state_of(module):
    bn = module.net[2]
    return bn.running_mean.clone(), bn.running_var.clone(), [m.training for m in module.modules()]


class Snapshot(Callback):
    """Runs before the attack: BatchNorm statistics and every module's mode."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.state = state_of(pl_module)


class Compare(Callback):
    """Runs after the attack: the same statistics and modes (the frozen submodule still in eval)."""

    def __init__(self, snapshot):
        self.snapshot, self.checked = snapshot, 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        mean, var, modes = state_of(pl_module)
        assert torch.equal(mean, self.snapshot.state[0]) and torch.equal(var, self.snapshot.state[1])
        assert modes == self.snapshot.state[2] and not pl_module.frozen.training and pl_module.net.training
        self.checked += 1


def train(module, datamodule, callbacks, **kwargs):
    seed_everything(0)
    Trainer(**trainer_kwargs(limit_val_batches=0, **kwargs), callbacks=callbacks).fit(module, datamodule=datamodule)
    datamodule.setup("fit")
    return torch.cat(module.seen), datamodule.train_set.x


@pytest.mark.parametrize("structure", ["tuple", "list", "dict"])
def test_inputs_are_replaced_in_place_within_eps_and_range_for_every_batch_form(structure):
    model = Classifier()
    seen, clean = train(
        model, StructuredDigits(structure, shuffle=False), [AdversarialTraining("pgd", eps=EPS, steps=3)]
    )
    delta = (seen - clean).flatten(1).abs().amax(1)
    assert (delta > EPS / 2).float().mean() > 0.9, "nearly every sample was moved"
    assert delta.max() <= EPS + 1e-5 and seen.min() >= 0 and seen.max() <= 1


def test_fraction_start_epoch_and_warm_up():
    at = AdversarialTraining("fgsm", eps=EPS, fraction=0.5, start_epoch=1, warmup_epochs=2)
    seen, clean = train(Classifier(), StructuredDigits(shuffle=False), [at], max_epochs=3)
    n = len(clean)
    moved = [(seen[e * n : (e + 1) * n] - clean).flatten(1).abs().amax(1) for e in range(3)]
    first_half = torch.zeros(n, dtype=torch.bool)
    for start in range(0, n, 64):
        first_half[start : start + round(0.5 * min(64, n - start))] = True
    assert moved[0].max() == 0, "clean before start_epoch"
    assert torch.allclose(moved[1][first_half], torch.tensor(EPS / 2)), "half of eps in the first warm-up epoch"
    assert torch.allclose(moved[2][first_half], torch.tensor(EPS)), "full eps after the ramp"
    assert moved[1][~first_half].max() == moved[2][~first_half].max() == 0, "the rest of each batch stays clean"


def test_normalized_inputs_are_attacked_in_pixel_units_and_refused_without_bounds():
    bounds = InputBounds.normalized(mean=[0.5], std=[0.25])
    model = Classifier()
    seen, clean = train(
        model, NormalizedDigits(shuffle=False), [AdversarialTraining("pgd", eps=EPS, steps=3, bounds=bounds)]
    )
    delta = (seen - clean).flatten(1).abs().amax(1)
    assert delta.max() <= EPS / 0.25 + 1e-4 and delta.max() > EPS / 0.25 / 2, "eps of 0.1 pixel = 0.4 normalized"
    assert seen.min() >= -2 - 1e-5 and seen.max() <= 2 + 1e-5
    with pytest.raises(ValueError, match=r"outside the attack's bounds.*InputBounds.normalized\(mean, std\)"):
        train(Classifier(), NormalizedDigits(), [AdversarialTraining("pgd", eps=EPS)])


def test_attacks_leave_batchnorm_statistics_and_every_modules_mode_alone():
    before = Snapshot()
    after = Compare(before)
    train(Classifier(), StructuredDigits(), [before, AdversarialTraining("pgd", eps=EPS, steps=3), after])
    assert after.checked == 21


class CheckTrades(Callback):
    """At every step: the module's criterion gives CE + beta * KL(p(x) || p(x_adv)), computed here independently."""

    def __init__(self, at):
        self.at, self.checked = at, 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        x, y = split_batch(batch)
        adversarial = self.at._adversarial
        assert adversarial is not None and not torch.equal(adversarial, x), "TRADES keeps the batch clean"
        logits = pl_module(x)
        p, log_q = logits.softmax(1), pl_module(adversarial).log_softmax(1)
        expected = nn.functional.cross_entropy(logits, y) + 6.0 * (p * (p.log() - log_q)).sum(1).mean()
        torch.testing.assert_close(pl_module.criterion(logits, y), expected)
        self.at._adversarial = adversarial  # the check used it up; give it back to the real step
        self.checked += 1


def test_trades_adds_its_term_to_the_modules_loss_in_one_pass_and_gives_the_loss_back():
    at = AdversarialTraining("trades", eps=EPS, steps=3)
    model = Classifier()
    check = CheckTrades(at)
    train(model, StructuredDigits(), [at, check])
    assert check.checked == 21 and "forward" not in vars(model.criterion)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"eps": -0.1}, "eps must be a positive finite number"),
        ({"eps": float("nan")}, "eps must be a positive"),
        ({"attack": "pgdd"}, "Unknown attack 'pgdd'"),
        ({"fraction": 0}, r"fraction must lie in \(0, 1\]"),
        ({"steps": 0}, "steps must be an integer >= 1"),
        ({"bounds": (0, 1)}, "bounds must be an InputBounds"),
    ],
)
def test_bad_arguments_are_refused(kwargs, message):
    with pytest.raises((ValueError, TypeError), match=message):
        AdversarialTraining(**kwargs)


class DumpWeights(Callback):
    """Each rank's batches and a checksum of its weights, for the DDP test."""

    def __init__(self, folder):
        self.folder = folder

    def on_train_end(self, trainer, pl_module):
        seen = torch.cat(pl_module.seen)
        record = {"batches": len(pl_module.seen), "in_range": bool(seen.min() >= 0 and seen.max() <= 1)}
        record["weights"] = float(sum(p.double().sum() for p in pl_module.parameters()))
        Path(self.folder, f"rank{trainer.global_rank}.json").write_text(json.dumps(record))


@pytest.mark.slow
def test_two_process_ddp_trains_on_adversarial_inputs_and_keeps_the_ranks_in_step(tmp_path):
    trainer = Trainer(
        **trainer_kwargs(devices=2, strategy="ddp_spawn", limit_val_batches=0, default_root_dir=tmp_path),
        callbacks=[AdversarialTraining("fgsm_rs", eps=EPS), DumpWeights(str(tmp_path))],
    )
    trainer.fit(Classifier(), datamodule=StructuredDigits())
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert ranks[0] == ranks[1], "same weights on both ranks: the attack's forwards left DDP's gradient sync alone"
    assert ranks[0]["batches"] == 11 and ranks[0]["in_range"]


def fit_standard(epochs=5):
    seed_everything(0)
    model = SmallCNN()
    Trainer(**trainer_kwargs(max_epochs=epochs, limit_val_batches=0)).fit(model, datamodule=DigitsDataModule())
    return model


def test_robust_evaluation_attacks_under_lightnings_inference_mode_in_validation_and_test():
    model = fit_standard()
    clean, robust = PerClassMetrics(num_classes=10), RobustEvaluation(num_classes=10, eps=EPS, steps=10)
    trainer = Trainer(**trainer_kwargs(max_epochs=1, callbacks=[clean, robust]))
    trainer.validate(model, datamodule=DigitsDataModule(), verbose=False)
    results = trainer.test(model, datamodule=DigitsDataModule(), verbose=False)[0]
    assert trainer.validate_loop.inference_mode and trainer.test_loop.inference_mode
    assert robust.last("val")["stage"] == "val" and len(robust.last("test")["accuracy"]) == 10
    assert results["test/accuracy/macro"] > 0.85
    assert results["test/robust_accuracy/macro"] < results["test/accuracy/macro"] - 0.2, "a standard model is brittle"
    assert all(f"test/robust_accuracy/{c}" in results for c in range(10))


def test_autoattack_leaves_the_global_random_state_alone():
    model = fit_standard(epochs=1)

    def rng_after(callback):
        torch.manual_seed(123)
        trainer = Trainer(**trainer_kwargs(limit_test_batches=1, callbacks=[callback]))
        results = trainer.test(model, datamodule=DigitsDataModule(), verbose=False)[0]
        return torch.get_rng_state(), results

    without, _ = rng_after(PerClassMetrics(num_classes=10))  # Lightning's loaders draw from it too
    with_autoattack, results = rng_after(RobustEvaluation(num_classes=10, attack="autoattack", eps=EPS))
    assert torch.equal(with_autoattack, without)
    assert results["test/robust_accuracy/macro"] < 0.5


class ValidatedClassifier(Classifier):
    def validation_step(self, batch, batch_idx):
        x, y = split_batch(batch)
        self.log("val_loss", self.criterion(self(x), y))


def test_robust_evaluation_with_normalized_bounds_leaves_batchnorm_alone():
    model = ValidatedClassifier()
    train(model, NormalizedDigits(), [], max_epochs=1)
    bn = model.net[2]
    tracked, running_mean = int(bn.num_batches_tracked), bn.running_mean.clone()
    robust = RobustEvaluation(num_classes=10, eps=EPS, steps=3, bounds=InputBounds.normalized([0.5], [0.25]))
    Trainer(**trainer_kwargs(callbacks=[robust])).validate(model, datamodule=NormalizedDigits(), verbose=False)
    assert int(bn.num_batches_tracked) == tracked and torch.equal(bn.running_mean, running_mean)
    assert len(robust.last("val")["accuracy"]) == 10


def test_normalized_bounds_train_under_bf16_true():
    bounds = InputBounds.normalized(mean=[0.5], std=[0.25])
    model = Classifier()
    seen, _ = train(
        model,
        NormalizedDigits(shuffle=False),
        [AdversarialTraining("pgd", eps=EPS, steps=2, bounds=bounds)],
        precision="bf16-true",
        limit_train_batches=2,
    )
    assert seen.dtype == torch.bfloat16 and seen.min() >= -2 and seen.max() <= 2


def test_pgd_l2_on_feature_vectors_is_refused_with_the_alternative():
    class Flat(StructuredDigits):
        def setup(self, stage):
            super().setup(stage)
            for split in (self.train_set, self.val_set, self.test_set):
                split.x = split.x.flatten(1)

    with pytest.raises(ValueError, match=r"4-D image batches only.*attack='pgd'"):
        train(Classifier(), Flat(), [AdversarialTraining("pgd_l2", eps=0.5, steps=2)], limit_train_batches=1)


def test_bounds_from_the_training_inputs_fit_tabular_features_and_the_attack_stays_inside():
    class Tabular(StructuredDigits):
        """Feature vectors on their own scales, as tabular data comes."""

        def setup(self, stage):
            super().setup(stage)
            scale = torch.linspace(0.5, 20.0, 64)
            for split in (self.train_set, self.val_set, self.test_set):
                split.x = split.x.flatten(1) * scale - 3.0

    data = Tabular(shuffle=False)
    bounds = InputBounds.from_data(data)
    data.setup("fit")
    data.setup("test")
    splits = torch.cat([data.train_set.x, data.val_set.x, data.test_set.x])
    assert torch.equal(bounds.low, splits.amin(0)), "every split's inputs inside the bounds"
    assert bool((bounds.high > bounds.low).all())
    seen, clean = train(Classifier(), data, [AdversarialTraining("pgd", eps=EPS, steps=2, bounds=bounds)])
    assert bool((seen >= bounds.low - 1e-5).all() and (seen <= bounds.high + 1e-5).all())
    assert not torch.equal(seen, clean[: len(seen)]), "the inputs were attacked"


class PreBatched(torch.utils.data.Dataset):
    """Batches served as slices of one tensor: views of the dataset's own storage."""

    def __init__(self):
        digits = DigitsDataModule()
        digits.setup("fit")
        self.x, self.y = (t[:256].clone() for t in digits.train_set.tensors)

    def __len__(self):
        return 4

    def __getitem__(self, i):
        return self.x[64 * i : 64 * (i + 1)], self.y[64 * i : 64 * (i + 1)]


def test_inputs_that_are_views_of_the_dataset_are_refused_and_the_dataset_kept():
    dataset = PreBatched()
    original = dataset.x.clone()
    loader = torch.utils.data.DataLoader(dataset, batch_size=None)
    trainer = Trainer(**trainer_kwargs(callbacks=[AdversarialTraining("pgd", eps=EPS, steps=2)]))
    with pytest.raises(ValueError, match="share memory with a larger tensor"):
        trainer.fit(Classifier(), train_dataloaders=loader)
    assert torch.equal(dataset.x, original)


def test_an_attack_that_reseeds_the_global_rng_does_not_repeat_the_draws_of_training():
    class Draws(Callback):
        def __init__(self):
            self.values = []

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            self.values.append(float(torch.rand(1)))

    def reseeding(model, eps):
        import torchattacks

        return torchattacks.APGD(model, eps=eps, steps=1, n_restarts=1)  # sets torch.manual_seed on each call

    draws = Draws()
    train(Classifier(), StructuredDigits(), [AdversarialTraining(reseeding, eps=EPS), draws], limit_train_batches=5)
    assert len(set(draws.values)) == 5


def test_the_same_checkpoint_gets_the_same_robust_numbers_in_any_trainer(tmp_path):
    seed_everything(0)
    settings = {"enable_checkpointing": True, "default_root_dir": tmp_path}
    trainer = Trainer(**trainer_kwargs(max_epochs=2, **settings), callbacks=[RobustEvaluation(num_classes=10, steps=1)])
    trainer.fit(SmallCNN(), datamodule=DigitsDataModule())
    checkpoint = trainer.checkpoint_callback.best_model_path
    after_fit = trainer.test(datamodule=DigitsDataModule(), ckpt_path=checkpoint, verbose=False)[0]
    seed_everything(1)  # another process: its own initial seed, and an epoch counter at 0
    fresh = Trainer(**trainer_kwargs(), callbacks=[RobustEvaluation(num_classes=10, steps=1)])
    again = fresh.test(SmallCNN(), datamodule=DigitsDataModule(), ckpt_path=checkpoint, verbose=False)[0]
    assert after_fit["test/robust_accuracy/macro"] == again["test/robust_accuracy/macro"]


def test_a_checkpoint_saved_outside_fit_resumes_with_random_starts(tmp_path):
    seed_everything(0)
    attack, data = AdversarialTraining("fgsm_rs", eps=EPS), DigitsDataModule()
    trainer = Trainer(**trainer_kwargs(max_epochs=1), callbacks=[attack])
    trainer.validate(SmallCNN(), datamodule=data, verbose=False)
    trainer.save_checkpoint(tmp_path / "validated.ckpt")  # the attack never set up for fit: no seed to keep
    resumed = Trainer(**trainer_kwargs(max_epochs=1), callbacks=[AdversarialTraining("fgsm_rs", eps=EPS)])
    resumed.fit(SmallCNN(), datamodule=data, ckpt_path=tmp_path / "validated.ckpt")
    assert resumed.global_step > 0
