"""The MNIST and CIFAR-10 recipes, run in-process on small stand-in files that the test writes (no download)."""

import pickle

import numpy as np
import pytest
import torchvision
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig

from robust_lightning.cli import run
from robust_lightning.config import CONFIG_DIR, register_recipes
from robust_lightning.data.vision import NORMALIZATION


def write_mnist(root, n=96):
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for prefix in ("train", "t10k"):
        images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        labels = np.arange(n, dtype=np.uint8) % 10
        # The idx format: a big-endian magic number and the dimensions, then the bytes.
        (raw / f"{prefix}-images-idx3-ubyte").write_bytes(
            np.array([2051, n, 28, 28], ">i4").tobytes() + images.tobytes()
        )
        (raw / f"{prefix}-labels-idx1-ubyte").write_bytes(np.array([2049, n], ">i4").tobytes() + labels.tobytes())


def write_cifar10(root, n=40):
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), "labels": list(np.arange(n) % 10)}
        (folder / name).write_bytes(pickle.dumps(batch))
    (folder / "batches.meta").write_bytes(pickle.dumps({"label_names": [str(c) for c in range(10)]}))


def run_recipe(recipe, root, out):
    register_recipes()
    overrides = [
        f"recipe={recipe}",
        f"data.root={root}",
        "data.download=false",
        "data.num_workers=0",
        "trainer.max_epochs=1",
        "trainer.enable_progress_bar=false",
        "adversarial.training.steps=2",
        "adversarial.evaluation.steps=2",
        f"hydra.runtime.output_dir={out}",
    ]
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose("config", overrides=overrides, return_hydra_config=True)
        HydraConfig.instance().set_config(cfg)
        del cfg.hydra
        return cfg, run(cfg, out)


@pytest.mark.parametrize("recipe", ["mnist_pgd_at", "cifar10_pgd_at"])
def test_the_download_recipes_train_and_attack_in_pixel_units(tmp_path, monkeypatch, recipe):
    if recipe.startswith("mnist"):
        write_mnist(tmp_path / "data")
    else:
        write_cifar10(tmp_path / "data")
        # The stand-in files cannot match the real archive's checksums, which CIFAR10 verifies.
        monkeypatch.setattr(torchvision.datasets.cifar, "check_integrity", lambda *args, **kwargs: True)
    cfg, results = run_recipe(recipe, tmp_path / "data", tmp_path / "run")
    assert 0 <= results["test/robust_accuracy/macro"] <= results["test/accuracy/macro"] + 1e-6
    mean, std = NORMALIZATION[cfg.data.name]
    assert list(cfg.adversarial.training.bounds.mean) == list(mean), "the recipe's bounds match the normalization"
    assert list(cfg.adversarial.training.bounds.std) == list(std)
    assert (tmp_path / "run" / "results.json").exists()
