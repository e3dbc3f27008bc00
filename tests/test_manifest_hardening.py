"""Manifests an attacker has emptied, cut short, edited or re-signed are refused, by the command and by training."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import pytest
from helpers import compose_and_run, trainer_kwargs
from lightning.pytorch import Trainer
from test_cli import cli, run_folder

from robust_lightning import RobustDataModule
from robust_lightning.data import DigitsDataModule
from robust_lightning.integrity import IntegrityError, Manifest
from robust_lightning.integrity.access import writable_paths
from robust_lightning.integrity.command import main as manifest_command
from robust_lightning.models import SmallCNN

NOBODY = 65534
FAST = ["trainer.max_epochs=1", "trainer.enable_progress_bar=false", "+trainer.limit_train_batches=2"]


@pytest.fixture(scope="module")
def unsigned(tmp_path_factory):
    """The digits' manifest, as `create` writes it."""
    path = tmp_path_factory.mktemp("manifest") / "unsigned.json"
    assert manifest_command(["create", str(path)]) == 0
    return path


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    """Two key pairs, the data owner's and another's, and manifests of the digits signed by each."""
    folder = tmp_path_factory.mktemp("keys")
    for owner in ("owner", "other"):
        assert manifest_command(["keygen", str(folder / owner)]) == 0
    for name, key in (("signed", "owner"), ("other", "other")):
        assert (
            manifest_command(["create", str(folder / f"{name}.json"), "--key", str(folder / key / "private.pem")]) == 0
        )
    return folder


def _rewrite(source, target, change):
    """``source`` changed by ``change(document)``, with its digest made to match again, as an attacker would."""
    document = json.loads(source.read_text())
    change(document)
    splits = {n: [(s["sha256"], s["label"]) for s in samples] for n, samples in document["splits"].items()}
    document["digest"] = Manifest(splits).digest
    target.write_text(json.dumps(document))
    return target


def _relabel(document):
    document["splits"]["train"][0]["label"] = 9 - document["splits"]["train"][0]["label"]


def _fit(datamodule):
    trainer = Trainer(**trainer_kwargs(limit_train_batches=2, limit_val_batches=1))
    trainer.fit(SmallCNN(), datamodule=datamodule)
    return trainer


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda d: d["splits"].clear(), "records no samples of any split: an emptied manifest verifies nothing"),
        (lambda d: d["splits"].pop("test"), "records no test split, which the data has (it records: train, val)"),
        (lambda d: d["splits"].update(train=[], val=[]), "records no samples of the train, val split"),
    ],
    ids=["empty", "partial", "emptied splits"],
)
def test_an_emptied_or_partial_manifest_is_refused(unsigned, tmp_path, capsys, change, message):
    forged = _rewrite(unsigned, tmp_path / "forged.json", change)
    assert manifest_command(["verify", str(forged)]) == 1
    assert message in capsys.readouterr().err
    with pytest.raises(IntegrityError, match=message.split(":")[0].split("(")[0]):
        _fit(RobustDataModule(DigitsDataModule(), manifest=forged))


def test_a_hand_edited_manifest_is_refused_by_the_command(unsigned, tmp_path, capsys):
    document = json.loads(unsigned.read_text())
    _relabel(document)
    edited = tmp_path / "edited.json"
    edited.write_text(json.dumps(document))
    assert manifest_command(["verify", str(edited)]) == 1
    assert "does not match its own digest: it was edited or corrupted" in capsys.readouterr().err


def _signed_then_edited(keys, tmp_path):
    return _rewrite(keys / "signed.json", tmp_path / "edited.json", _relabel)


@pytest.mark.parametrize(
    ("manifest", "message"),
    [
        (lambda keys, unsigned, tmp: unsigned, "is refused: it is not signed"),
        (lambda keys, unsigned, tmp: keys / "other.json", "is refused: it is signed by another key"),
        (lambda keys, unsigned, tmp: _signed_then_edited(keys, tmp), "does not match its content: it was edited"),
    ],
    ids=["unsigned", "another key", "edited after signing"],
)
def test_with_a_public_key_only_the_owners_signed_manifest_passes(keys, unsigned, tmp_path, capsys, manifest, message):
    path, public = manifest(keys, unsigned, tmp_path), str(keys / "owner" / "public.pem")
    assert manifest_command(["verify", str(path), "--public-key", public]) == 1
    assert message in capsys.readouterr().err
    with pytest.raises(IntegrityError, match=message.split(":")[-1].strip()):
        RobustDataModule(DigitsDataModule(), manifest=path, public_key=public)
    assert manifest_command(["verify", str(keys / "signed.json"), "--public-key", public]) == 0
    assert "OK: the data matches" in capsys.readouterr().out


def test_training_from_the_command_line_verifies_the_signature_and_never_sees_the_private_key(keys, tmp_path):
    public = keys / "owner" / "public.pem"
    with pytest.raises(IntegrityError, match="it is signed by another key"):
        compose_and_run([*FAST, f"+robust.manifest={keys / 'other.json'}", f"+robust.public_key={public}"], tmp_path)
    signed = [f"+robust.manifest={keys / 'signed.json'}", f"+robust.public_key={public}"]
    result = cli(*FAST, *signed, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    run_dir = run_folder(result.stdout)
    assert (run_dir / "report.html").is_file()
    secret = (keys / "owner" / "private.pem").read_bytes()
    body = b"".join(secret.splitlines()[1:-1])
    for path in run_dir.rglob("*"):
        if path.is_file():
            content = path.read_bytes()
            assert body not in content and b"PRIVATE KEY" not in content and b"private.pem" not in content, path


def test_keygen_refuses_to_replace_a_key_pair(keys, capsys):
    assert manifest_command(["keygen", str(keys / "owner")]) == 2
    assert "already holds a key pair" in capsys.readouterr().err


class FolderDigits(DigitsDataModule):
    """The digits, with a data folder named the way torchvision-style datamodules name theirs."""

    def __init__(self, root):
        super().__init__()
        self.root = root


def test_data_the_training_process_can_write_is_refused_or_warned_about(unsigned, tmp_path, caplog):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "digits.npz").write_bytes(b"0")
    manifest = unsigned
    with pytest.raises(
        IntegrityError, match=r"can write to 2 of the data paths it reads .*Fix: mount the data read-only"
    ):
        _fit(RobustDataModule(FolderDigits(tmp_path / "data"), manifest=manifest))
    with pytest.warns(UserWarning, match="can write to 2 of the data paths"):
        _fit(RobustDataModule(FolderDigits(tmp_path / "data"), manifest=manifest, writable_data="warn"))
    with caplog.at_level("INFO", logger="robust_lightning"):
        _fit(RobustDataModule(DigitsDataModule(), manifest=manifest))
    assert "DigitsDataModule names no data files" in caplog.text


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() != 0, reason="needs root to run a check as another user")
def test_data_the_training_process_cannot_write_passes():
    # Root may write anything but a read-only mount, so a forked child drops to the unprivileged user
    # nobody and checks data root owns: the case of a training job given read-only access to its data.
    folder = Path(tempfile.mkdtemp(dir="/tmp"))
    try:
        folder.chmod(0o755)
        (folder / "digits.npz").write_bytes(b"0")
        child = os.fork()
        if child == 0:  # the child leaves by os._exit whatever happens, never back into pytest
            status = 99
            try:
                os.setgid(NOBODY)
                os.setuid(NOBODY)
                if all(os.access(p, os.R_OK) for p in (folder, folder / "digits.npz")):
                    status = len(writable_paths([folder]))
            finally:
                os._exit(status)
        _, status = os.waitpid(child, 0)
        assert os.waitstatus_to_exitcode(status) == 0, "0 writable paths, and the data readable"
        assert writable_paths([folder]) == [folder, folder / "digits.npz"], "root itself may write both"
    finally:
        shutil.rmtree(folder)
