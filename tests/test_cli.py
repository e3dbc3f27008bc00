"""The robust-lightning command, run as a user runs it: the installed console script, in a fresh folder."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from helpers import ReportPage, check_report, compose_and_run

SCRIPT = shutil.which("robust-lightning", path=str(Path(sys.executable).parent)) or shutil.which("robust-lightning")
FAST = ["trainer.max_epochs=2", "trainer.enable_progress_bar=false"]


def cli(*args, cwd):
    assert SCRIPT, "the robust-lightning console script is not installed; run the README's set-up command"
    return subprocess.run([SCRIPT, *args], cwd=cwd, capture_output=True, text=True, timeout=300, check=False)


def run_folder(stdout: str) -> Path:
    line = next(line for line in stdout.splitlines() if line.startswith("Run folder: "))
    return Path(line.removeprefix("Run folder: "))


def test_the_default_recipe_prints_the_per_class_table_and_fills_the_run_folder(tmp_path):
    result = cli(*FAST, "filter.poison_filter.start_epoch=1", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    assert "Data summary (samples per class):" in out
    table = out.split("Test results per class (%):\n")[1].splitlines()
    assert table[0].split()[:5] == ["class", "accuracy", "precision", "recall", "f1"]
    rows = {line.split()[0]: line.split() for line in table[1:11]}
    assert sorted(rows) == list("0123456789")
    poisoned = {c: int(rows[c][-1]) for c in rows}
    assert {c for c, n in poisoned.items() if n} == {"4", "6", "8", "9"}

    folder = run_folder(out)
    assert folder.is_relative_to(tmp_path / "runs")
    config = yaml.safe_load((folder / "config.yaml").read_text())
    assert config["poison"]["rate"] == 0.4 and config["trainer"]["max_epochs"] == 2
    assert "${" not in (folder / "config.yaml").read_text(), "the saved config is resolved"
    metrics_csv = (folder / "metrics.csv").read_text().splitlines()
    assert "val/recall/4" in metrics_csv[0] and "test/f1/macro" in metrics_csv[0]
    assert (folder / "checkpoints" / "last.ckpt").stat().st_size > 0
    assert f"Report with plots: {folder / 'report.html'}" in out
    figures = {"training_curves.png", "per_class_accuracy.png", "confusion.png", "drift.png", "suspicious_samples.png"}
    assert figures <= check_report(folder)
    headings = ReportPage((folder / "report.html").read_text()).headings
    assert headings[:2] == ["Summary", "Loss and accuracy"] and headings[-1] == "Configuration"
    assert {"Poisoned-sample filter: scores", "Most suspicious training samples", "Drift"} <= set(headings)
    hparams = yaml.safe_load((folder / "hparams.yaml").read_text())
    assert hparams["batch_size"] == 64 and hparams["lr"] == 0.003, "the wrapped datamodule's hparams are logged"


def test_help_lists_recipes_and_config_groups(tmp_path):
    result = cli("--help", cwd=tmp_path)
    assert result.returncode == 0
    for line in (
        (
            "recipe: cifar10_pgd_at, digits_backdoor, digits_clean, digits_clean_label_backdoor, digits_fast_at, "
            "digits_feature_collision, digits_injection, digits_loss_sweep, digits_pairflip, digits_pgd_at, "
            "digits_sym40, digits_sym40_elr, digits_sym40_mixup, digits_trades, mnist_pgd_at"
        ),
        "adversarial: fgsm_rs, pgd, trades",
        "poison: backdoor, class_injection, clean_label_backdoor, feature_collision, pair_flip, symmetric",
        "filter: default, exclude_only, near_duplicates, none",
        "loss: bootstrap_hard, bootstrap_soft, ce, elr, forward, gce, label_smoothing, nce_rce, sce, taylor",
        "data: cifar10, digits, mnist",
        "model: small_cnn",
        "trainer: cpu, ddp, ddp_cpu, default, gpu, multinode",
        "callbacks: default",
        "logger: csv",
    ):
        assert line in result.stdout


def test_another_recipe_runs_logging_to_tensorboard_with_one_line_per_epoch_in_a_log(tmp_path):
    result = cli("recipe=digits_clean", "trainer.max_epochs=2", "logger=tensorboard", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Test results per class (%):" in result.stdout and "poisoned in train" not in result.stdout
    epochs = [line for line in result.stdout.splitlines() if line.startswith("Epoch ")]
    assert [line.split(":")[0] for line in epochs] == ["Epoch 1/2", "Epoch 2/2"] and "val/acc" in epochs[0]
    assert "\r" not in result.stdout + result.stderr, "no progress bar redrawn in a log"
    assert list((run_folder(result.stdout) / "tensorboard").glob("events.out.tfevents.*"))


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("trainer.max_epoch=1", "Key 'max_epoch' is not in struct"),
        ("+filter._target_=robust_lightning.callbacks.PoisonFilter", "it is now a set of named ones"),
    ],
)
def test_the_command_prints_a_clear_message_for_a_mistake(tmp_path, override, message):
    result = cli(*override.split(), *FAST, cwd=tmp_path)
    assert result.returncode != 0
    assert message in result.stdout + result.stderr


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("trainer.max_epoch=1", "Key 'max_epoch' is not in struct"),
        ("+seeed=1", "Unknown config key(s): 'seeed' (did you mean 'seed'?)"),
        ("filter.poison_filter.start_epoch=0", "start_epoch must be an integer >= 1"),
        ("+filter._target_=robust_lightning.callbacks.PoisonFilter", "it is now a set of named ones"),
        ("poison.rate=-0.1", "A poison rate must lie in [0, 1), got -0.1"),
        ("loss=gce loss.q=0", "q must lie in (0.0, 1.0], got 0"),
        ("adversarial=pgd adversarial.training.eps=-0.1", "eps must be a positive finite number, got -0.1"),
        ("recipe=digits_pairfilp", "Could not find 'recipe/digits_pairfilp'"),
        ("mode=tset", "mode='tset' is not a mode: use one of train, test, audit."),
        ("mode=test", "mode=test reads a trained checkpoint: add ckpt_path=PATH"),
        ("trainer.max_epochs=abc", "Config key trainer.max_epochs has the wrong type: 'abc' is not a valid int"),
        ("trainer.enable_progress_bar=maybe", "Config key trainer.enable_progress_bar has the wrong type"),
        ("seed=one", "Config key seed has the wrong type: 'one' is not a valid int"),
        ("num_classes=12", "num_classes=12 is given, but DigitsDataModule.num_classes is 10"),
    ],
)
def test_mistakes_fail_with_a_clear_message(tmp_path, override, message):
    # Hydra, OmegaConf and our own checks each raise their own type: the message is what the user reads.
    with pytest.raises(Exception) as raised:
        compose_and_run([*FAST, *override.split()], tmp_path)
    text = str(raised.value) + str(raised.value.__cause__ or "")
    assert message in text, text


@pytest.mark.slow
@pytest.mark.parametrize("recipe", ["digits_pairflip", "digits_sym40_elr", "digits_sym40 filter=exclude_only"])
def test_the_filtering_recipes_run_under_two_process_ddp(tmp_path, recipe):
    ddp = [
        "trainer.strategy=ddp_spawn",
        "trainer.devices=2",
        "trainer.accelerator=cpu",
        "filter.poison_filter.start_epoch=1",
    ]
    result = cli(*f"recipe={recipe}".split(), *FAST, *ddp, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    flagged = (run_folder(result.stdout) / "flagged.csv").read_text().splitlines()
    assert flagged[0] == "id,label,score,detector" and len(flagged) > 1, "the filter ran in the workers"
    table = result.stdout.split("Test results per class (%):\n")[1].splitlines()
    assert [line.split()[0] for line in table[1:11]] == list("0123456789")
    assert (run_folder(result.stdout) / "checkpoints" / "last.ckpt").exists()


@pytest.mark.parametrize(
    "recipe",
    [
        "digits_backdoor",
        *(
            pytest.param(r, marks=pytest.mark.slow)
            for r in ("digits_sym40", "digits_sym40_elr", "digits_sym40 filter=exclude_only")
        ),
    ],
)
def test_the_filtering_recipes_run_the_filter_and_report_it(tmp_path, recipe):
    fast = ["trainer.max_epochs=3", "filter.poison_filter.start_epoch=2", "trainer.enable_progress_bar=false"]
    result = cli(*f"recipe={recipe}".split(), *fast, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "PoisonFilter flagged" in result.stdout and "against the drill" in result.stdout
    assert ("Attack success rate on the triggered test set" in result.stdout) == (recipe == "digits_backdoor")
    assert ("Trained with ELRLoss in place of the module's criterion" in result.stdout) == recipe.endswith("_elr")
    assert (run_folder(result.stdout) / "flagged.csv").read_text().startswith("id,label,score,detector")


def test_a_robust_loss_set_directly_as_the_models_criterion(tmp_path):
    elr = ["model.criterion._target_=robust_lightning.losses.ELRLoss", "+model.criterion.num_classes=10"]
    result = cli(*elr, "trainer.max_epochs=1", "trainer.enable_progress_bar=false", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    checkpoint = torch.load(run_folder(result.stdout) / "checkpoints" / "last.ckpt", weights_only=False)
    targets = checkpoint["state_dict"]["criterion.ema_targets"]
    assert targets.shape == (1293, 10) and (targets.sum(1) > 0).all(), "every sample's target, from the ids"


@pytest.mark.slow
def test_the_loss_sweep_writes_one_summary_table(tmp_path):
    sweep = ["-m", "recipe=digits_loss_sweep", "loss=ce,gce", "poison.rate=0.2,0.6"]
    result = cli(*sweep, "trainer.max_epochs=1", "trainer.enable_progress_bar=false", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    (summary,) = (tmp_path / "multirun").glob("*/summary.md")
    lines = summary.read_text().splitlines()
    assert lines[1] == "| loss | poison.rate=0.2 | poison.rate=0.6 |"
    assert [line.split(" | ")[0] for line in lines[3:]] == ["| ce", "| gce"]
    accuracies = [float(cell) for line in lines[3:] for cell in line.strip("| ").split(" | ")[1:]]
    assert len(accuracies) == 4 and all(0 < a <= 100 for a in accuracies)
    rows = (summary.parent / "summary.csv").read_text().splitlines()
    assert rows[0].startswith("loss,poison.rate,test/acc") and len(rows) == 5


@pytest.mark.parametrize("recipe", ["digits_pgd_at", pytest.param("digits_trades", marks=pytest.mark.slow)])
def test_the_adversarial_recipes_report_robust_accuracy_per_class(tmp_path, recipe):
    result = cli(f"recipe={recipe}", "trainer.max_epochs=1", "trainer.enable_progress_bar=false", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    table = result.stdout.split("Test results per class (%):\n")[1].splitlines()
    assert "robust acc" in table[0]
    assert "Robust accuracy (pgd, 20 steps, eps 0.1):" in result.stdout
    results = json.loads((run_folder(result.stdout) / "results.json").read_text())
    assert results["test/robust_accuracy/macro"] < results["test/accuracy/macro"]


@pytest.mark.slow
def test_the_regularization_recipes_run(tmp_path):
    fast = ["trainer.max_epochs=2", "trainer.enable_progress_bar=false"]
    result = cli("recipe=digits_injection", *fast, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "PoisonFilter flagged" in result.stdout and "poisoned in train" in result.stdout
    result = cli("recipe=digits_sym40_mixup", "loss=label_smoothing", "model.weight_decay=5e-4", *fast, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    config = yaml.safe_load((run_folder(result.stdout) / "config.yaml").read_text())
    assert config["callbacks"]["mixup"]["alpha"] == 1.0 and config["loss"]["label_smoothing"] == 0.1
    assert config["model"]["weight_decay"] == 5e-4
    result = cli("model.weight_decay=-1", *fast, cwd=tmp_path)
    assert result.returncode != 0 and "weight_decay must be >= 0" in result.stderr


@pytest.mark.slow
def test_the_ddp_cpu_trainer_config_runs_plain_ddp_into_one_run_folder(tmp_path):
    # Plain DDP starts the command again for rank 1; Lightning points Hydra at the same run folder.
    result = cli("trainer=ddp_cpu", "data.batch_size=32", "filter.poison_filter.start_epoch=1", *FAST, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert [p.name for p in (tmp_path / "runs").iterdir()] == [run_folder(result.stdout).name]
    folder = run_folder(result.stdout)
    assert (folder / "flagged.csv").exists() and (folder / "report.html").exists()
    assert "PoisonFilter flagged" in result.stdout, "rank zero's filter summary reaches the closing lines"
    assert yaml.safe_load((folder / "config.yaml").read_text())["trainer"]["strategy"] == "ddp"


@pytest.mark.slow
def test_own_data_from_a_config_dir_takes_num_classes_from_the_datamodule(tmp_path):
    (tmp_path / "conf" / "data").mkdir(parents=True)
    (tmp_path / "conf" / "data" / "mine.yaml").write_text(
        "# @package _global_\ndata:\n  _target_: robust_lightning.data.DigitsDataModule\n  batch_size: 128\n"
    )
    (tmp_path / "conf" / "data" / "unknown.yaml").write_text(
        "# @package _global_\ndata:\n  _target_: robust_lightning.data.splits.SplitsDataModule\n"
    )
    own = ["--config-dir", str(tmp_path / "conf"), "recipe=digits_clean", "trainer.max_epochs=1"]
    result = cli(*own, "data=mine", "trainer.enable_progress_bar=false", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    config = yaml.safe_load((run_folder(result.stdout) / "config.yaml").read_text())
    assert config["num_classes"] == 10 and config["data"]["batch_size"] == 128
    refused = cli(*own, "data=unknown", cwd=tmp_path)
    assert refused.returncode != 0 and "Add `num_classes: N` to your data config" in refused.stderr
