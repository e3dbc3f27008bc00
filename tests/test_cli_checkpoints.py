"""The command line on a checkpoint: a killed run resumed exactly in its own folder, a test and an audit of it."""

import json
import os
import re
import signal
from pathlib import Path

import pytest
import torch
from test_cli import cli, run_folder

from robust_lightning.cli import checkpoint_arguments

SHORT = ["trainer.max_epochs=4", "trainer.enable_progress_bar=false", "filter.poison_filter.start_epoch=1"]
KILL = "+callbacks.kill={_target_: helpers.KillAtEpoch, epoch: 2}"


def cli_with_helpers(*args, cwd):
    """The command with the tests' helpers importable, as a user's own package is."""
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(Path(__file__).parent), os.environ.get("PYTHONPATH")]))
    return cli(*args, cwd=cwd)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One run of the default recipe, whole."""
    folder = tmp_path_factory.mktemp("whole")
    result = cli(*SHORT, f"hydra.run.dir={folder / 'run'}", cwd=folder)
    assert result.returncode == 0, result.stderr[-3000:]
    return folder / "run"


def weights(folder: Path) -> dict[str, torch.Tensor]:
    return torch.load(folder / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"]


@pytest.mark.slow
def test_a_killed_run_resumed_with_ckpt_path_last_ends_as_the_uninterrupted_one(trained, tmp_path):
    killed = cli_with_helpers(*SHORT, KILL, f"hydra.run.dir={tmp_path / 'runs' / 'killed'}", cwd=tmp_path)
    assert killed.returncode == -signal.SIGKILL, "killed outright, after two epochs"
    folder = tmp_path / "runs" / "killed"
    assert not (folder / "results.json").exists()
    resumed = cli_with_helpers("ckpt_path=last", "~callbacks.kill", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert run_folder(resumed.stdout) == folder.resolve(), "the run goes on in its own folder"
    assert (folder / "metrics.csv").read_text() == (trained / "metrics.csv").read_text(), "the same rows, in order"
    assert (folder / "flagged.csv").read_text() == (trained / "flagged.csv").read_text()
    assert json.loads((folder / "results.json").read_text()) == json.loads((trained / "results.json").read_text())
    whole, again = weights(trained), weights(folder)
    assert all(torch.equal(whole[name], again[name]) for name in whole)
    report, whole_report = ((f / "report.md").read_text().split("## Configuration") for f in (folder, trained))
    assert report[0] == whole_report[0], "the report covers all epochs"
    assert f"ckpt_path: {folder.resolve() / 'checkpoints' / 'last.ckpt'}" in report[1], "the config says it resumed"


def test_mode_test_reports_clean_per_class_and_robust_accuracy_of_a_checkpoint(trained):
    result = cli(f"ckpt_path={trained / 'checkpoints' / 'last.ckpt'}", "mode=test", cwd=trained.parent)
    assert result.returncode == 0, result.stderr[-3000:]
    assert run_folder(result.stdout) == (trained / "test").resolve()
    assert "Robust accuracy (pgd, 20 steps, eps 0.1)" in result.stdout and "robust acc" in result.stdout
    tested = json.loads((trained / "test" / "results.json").read_text())
    assert tested["test/accuracy/macro"] == json.loads((trained / "results.json").read_text())["test/accuracy/macro"]
    assert "test/robust_accuracy/macro" in tested and (trained / "test" / "report.html").exists()
    assert not (trained / "test" / "checkpoints").exists(), "nothing trained, nothing saved"


def test_mode_audit_flags_the_drill_from_a_checkpoint_without_training(trained):
    checkpoint = (trained / "checkpoints" / "last.ckpt").read_bytes()
    result = cli(f"ckpt_path={trained / 'checkpoints' / 'last.ckpt'}", "mode=audit", cwd=trained.parent)
    assert result.returncode == 0, result.stderr[-3000:]
    audited = json.loads((trained / "audit" / "results.json").read_text())
    assert audited["samples"] == 1293 and audited["f1"] > 0.7, audited
    assert f"F1 {audited['f1']:.2f} against the drill" in result.stdout
    rows = (trained / "audit" / "flagged.csv").read_text().splitlines()
    assert rows[0] == "id,label,score,detector" and len(rows) == audited["flagged"] + 1
    report = (trained / "audit" / "report.md").read_text()
    assert "Nothing was trained." in report and "| linear_probe |" in report
    assert (trained / "checkpoints" / "last.ckpt").read_bytes() == checkpoint


def test_ckpt_path_composes_the_checkpoints_run_again(tmp_path, monkeypatch):
    folder = tmp_path / "runs" / "2026-01-01_00-00-00"
    (folder / "checkpoints").mkdir(parents=True)
    (folder / "checkpoints" / "last.ckpt").write_bytes(b"")
    (folder / ".hydra").mkdir()
    (folder / ".hydra" / "overrides.yaml").write_text(
        "- recipe=digits_sym40\n- '+callbacks.kill={epoch: 2}'\n- mode=train\n- trainer.max_epochs=4\n"
    )
    checkpoint = folder / "checkpoints" / "last.ckpt"
    line = checkpoint_arguments(["prog", "--config-dir", "c", f"ckpt_path={checkpoint}", "~callbacks.kill", "seed=1"])
    assert line == [
        "prog", "--config-dir", "c", "recipe=digits_sym40", "trainer.max_epochs=4", f"hydra.run.dir={folder}",
        f"ckpt_path={checkpoint}", "seed=1",
    ]  # fmt: skip
    monkeypatch.chdir(tmp_path)
    assert checkpoint_arguments(["prog", "ckpt_path=last", "mode=audit"]) == [
        "prog", "recipe=digits_sym40", "+callbacks.kill={epoch: 2}", "trainer.max_epochs=4",
        f"hydra.run.dir={folder / 'audit'}", f"ckpt_path={checkpoint}", "mode=audit",
    ]  # fmt: skip
    outside = tmp_path / "model.ckpt"
    outside.write_bytes(b"")
    assert checkpoint_arguments(["prog", f"ckpt_path={outside}"]) == ["prog", f"ckpt_path={outside}"]
    assert checkpoint_arguments(["prog", "seed=1"]) == ["prog", "seed=1"]


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("nowhere.ckpt", "ckpt_path=nowhere.ckpt: no such checkpoint."),
        ("last", "ckpt_path=last: there is no last.ckpt under runs/*/checkpoints/"),
    ],
)
def test_a_missing_checkpoint_stops_the_command_with_a_clear_message(tmp_path, monkeypatch, value, message):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit, match=re.escape(message)):
        checkpoint_arguments(["prog", f"ckpt_path={value}"])
