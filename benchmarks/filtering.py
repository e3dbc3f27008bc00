"""Poisoned-sample filtering on the bundled digits: PoisonFilter against cleanlab and ART, side by side.

Every row trains the same SmallCNN (Adam, 40 epochs, batch 64) on the same split; only the
defence changes. PoisonFilter works inside the one training run; cleanlab (5-fold out-of-sample
probabilities) and ART (spectral signatures, activation clustering on the trained model) flag
samples after training, and the model is then retrained without them.

    pip install -e ".[bench]"
    python benchmarks/filtering.py            # 3 seeds, all scenarios and defences; writes docs/pages/filtering.md
    python benchmarks/filtering.py --seeds 0 --defences none filter
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import torch
from common import SCRATCH, load, mean, publish, quiet, save, trainer
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from torch.utils.data import DataLoader

from robust_lightning import RobustDataModule
from robust_lightning.callbacks import PoisonFilter
from robust_lightning.config import CONFIG_DIR, register_recipes
from robust_lightning.data import DigitsDataModule
from robust_lightning.detectors import detection_quality
from robust_lightning.models import SmallCNN
from robust_lightning.poison import BackdoorTrigger, PairFlip, SymmetricNoise

SCENARIOS: dict[str, Callable[[int], object]] = {
    "pair flip 40%": lambda seed: PairFlip({4: 8, 8: 4, 6: 9, 9: 6}, rate=0.4, seed=seed),
    "symmetric 40%": lambda seed: SymmetricNoise(rate=0.4, seed=seed),
    "BadNets 10%": lambda seed: BackdoorTrigger(target=0, rate=0.1, seed=seed),
    "clean": lambda seed: None,
}
DEFENCES = ("none", "filter", "exclude_only", "oracle", "cleanlab", "art_spectral", "art_clustering")
EPOCHS = 40
DOC = Path(__file__).resolve().parents[1] / "docs" / "pages" / "filtering.md"
MARK = "<!-- filtering benchmark table -->"


def fit(seed: int, poison, callbacks=(), keep: torch.Tensor | None = None):
    """Train SmallCNN on the poisoned digits; ``keep`` restricts training to those ids. Returns model, data, seconds."""
    pl.seed_everything(seed, verbose=False)
    data = RobustDataModule(DigitsDataModule(), poison=poison, seed=seed)
    model = SmallCNN()
    if keep is not None:
        data.setup("fit")
        data.exclude((~keep).nonzero().flatten())
    start = time.perf_counter()
    trainer(EPOCHS, callbacks).fit(model, datamodule=data)
    return model, data, time.perf_counter() - start


@torch.no_grad()
def predict(model: SmallCNN, dataset) -> torch.Tensor:
    model.eval()
    return torch.cat([model(x).softmax(1) for x, _ in DataLoader(dataset, batch_size=512)])


def outcome(model, data: RobustDataModule, poison, flagged: torch.Tensor | None, seconds: float) -> dict:
    test = data.datamodule.test_set
    probs = predict(model, test)
    row = {"acc": float((probs.argmax(1) == test.tensors[1]).float().mean()), "seconds": seconds}
    if isinstance(poison, BackdoorTrigger):
        row["asr"] = poison.attack_success_rate(model, test)
    if flagged is not None:
        row["removed"] = float(flagged.float().mean())
    if flagged is not None and data.poison_mask is not None:
        row.update(detection_quality(flagged, data.poison_mask))
    return row


def train_inputs(data: RobustDataModule) -> tuple[torch.Tensor, torch.Tensor]:
    """The training inputs and labels exactly as the model sees them (poisoned)."""
    samples = [data._train[i][0] for i in range(data.num_train)]
    return torch.stack([x for x, _ in samples]), torch.tensor([int(y) for _, y in samples])


def run_none(seed, poison):
    model, data, seconds = fit(seed, poison)
    return outcome(model, data, poison, None, seconds)


def filter_group(option: str) -> list:
    """The callbacks of the command line's ``filter=<option>``, so that the rows run what the recipes run."""
    register_recipes()  # the base config names a default recipe
    with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
        cfg = compose("config", overrides=[f"filter={option}", f"filter.poison_filter.dirpath={SCRATCH}"])
    return [instantiate(callback) for callback in cfg.filter.values()]


def run_filter(seed, poison, option="default"):
    callbacks = filter_group(option)
    model, data, seconds = fit(seed, poison, callbacks)
    (filter_,) = [c for c in callbacks if isinstance(c, PoisonFilter)]
    return outcome(model, data, poison, filter_.flags, seconds)


def run_oracle(seed, poison):
    """The ceiling of any filter that excludes: train without exactly the poisoned samples."""
    data = RobustDataModule(DigitsDataModule(), poison=poison, seed=seed)
    data.setup("fit")
    truth = data.poison_mask if data.poison_mask is not None else torch.zeros(data.num_train, dtype=torch.bool)
    return retrain_without(seed, poison, truth, 0.0)  # no time: a ceiling, not a method


def retrain_without(seed, poison, flagged, seconds):
    model, data, more = fit(seed, poison, keep=~flagged)
    return outcome(model, data, poison, flagged, seconds + more)


def cleanlab_flags(seed, poison) -> torch.Tensor:
    """cleanlab's label issues from 5-fold out-of-sample probabilities (5 trainings)."""
    from cleanlab.filter import find_label_issues
    from sklearn.model_selection import StratifiedKFold

    data = RobustDataModule(DigitsDataModule(), poison=poison, seed=seed)
    data.setup("fit")
    x, y = train_inputs(data)
    probs = torch.zeros(len(y), 10)
    for fold, (train, held) in enumerate(StratifiedKFold(5, shuffle=True, random_state=seed).split(x, y)):
        keep = torch.zeros(len(y), dtype=torch.bool)
        keep[train] = True
        model, _, _ = fit(seed + fold, poison, keep=keep)
        probs[held] = predict(model, torch.utils.data.TensorDataset(x[held], y[held]))
    return torch.as_tensor(find_label_issues(y.numpy(), probs.numpy()))


def run_cleanlab(seed, poison):
    start = time.perf_counter()
    flagged = cleanlab_flags(seed, poison)
    return retrain_without(seed, poison, flagged, time.perf_counter() - start)


def run_art(seed, poison, defence_name):
    from art.defences.detector.poison import ActivationDefence, SpectralSignatureDefense
    from art.estimators.classification import PyTorchClassifier

    model, data, seconds = fit(seed, poison)
    start = time.perf_counter()
    x, y = train_inputs(data)
    # ART reads its layers from the model's modules; without the Lightning wrapper the last one is the head.
    classifier = PyTorchClassifier(
        model=torch.nn.Sequential(model.features, model.head).eval(),
        loss=torch.nn.CrossEntropyLoss(),
        input_shape=(1, 8, 8),
        nb_classes=10,
        clip_values=(0, 1),
    )
    onehot = np.eye(10)[y.numpy()]
    if defence_name == "art_spectral":
        defence = SpectralSignatureDefense(classifier, x.numpy(), onehot, expected_pp_poison=0.1, batch_size=128)
    else:
        defence = ActivationDefence(classifier, x.numpy(), onehot)
    _, is_clean = defence.detect_poison()
    flagged = torch.as_tensor(np.asarray(is_clean) == 0)
    return retrain_without(seed, poison, flagged, seconds + time.perf_counter() - start)


RUNNERS = {
    "none": run_none,
    "filter": run_filter,
    "exclude_only": lambda seed, poison: run_filter(seed, poison, "exclude_only"),
    "oracle": run_oracle,
    "cleanlab": run_cleanlab,
    "art_spectral": lambda seed, poison: run_art(seed, poison, "art_spectral"),
    "art_clustering": lambda seed, poison: run_art(seed, poison, "art_clustering"),
}


def table(results: dict[tuple[str, str], list[dict]], seeds: list[int]) -> str:
    lines = [
        f"Means over seeds {seeds}; time is wall time relative to the same scenario with no defence.",
        "",
        "| scenario | defence | precision | recall | F1 | removed | test acc | ASR | time |",
        "|---|---|---|---|---|---|---|---|---|",
    ]

    def cell(value: float | None, percent: bool = False) -> str:
        if value is None:
            return "—"
        return f"{100 * value:.1f}%" if percent else f"{value:.2f}"

    order = {name: i for i, name in enumerate([*SCENARIOS, *DEFENCES])}
    for (scenario, defence), rows in sorted(results.items(), key=lambda item: (order[item[0][0]], order[item[0][1]])):
        base = mean(results.get((scenario, "none"), []), "seconds")
        ratio = mean(rows, "seconds") / base if base and defence != "oracle" else None  # a ceiling, not a method
        lines.append(
            f"| {scenario} | {defence} | {cell(mean(rows, 'precision'))} | {cell(mean(rows, 'recall'))} | "
            f"{cell(mean(rows, 'f1'))} | {cell(mean(rows, 'removed'), True)} | {cell(mean(rows, 'acc'), True)} | "
            f"{cell(mean(rows, 'asr'), True)} | {'—' if ratio is None else f'{ratio:.2f}x'} |"
        )
    return "\n".join(lines)


def warm_up() -> None:
    """A short fit whose time is not kept: the first fit of a process is slower, and would weigh on one row."""
    pl.seed_everything(0, verbose=False)
    trainer(2, []).fit(SmallCNN(), datamodule=RobustDataModule(DigitsDataModule(), seed=0))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--scenarios", nargs="+", default=list(SCENARIOS), choices=list(SCENARIOS))
    parser.add_argument("--defences", nargs="+", default=list(DEFENCES), choices=DEFENCES)
    parser.add_argument("--no-doc", action="store_true", help="print the table without writing docs/pages/filtering.md")
    parser.add_argument("--save", type=Path, help="also save the raw rows as JSON, to merge runs made in parallel")
    parser.add_argument("--merge", type=Path, nargs="+", help="render the table from saved JSON files instead")
    args = parser.parse_args()
    if args.merge:
        return publish(table(*load(args.merge)), DOC, MARK, args.no_doc)
    quiet()
    warm_up()
    results: dict[tuple[str, str], list[dict]] = {}
    for scenario in args.scenarios:
        for seed in args.seeds:
            # Defences alternate, and their order reverses from seed to seed, so that neither drift in machine
            # load nor the state one run leaves the machine in always falls on the same defence.
            for defence in args.defences if seed % 2 == 0 else args.defences[::-1]:
                row = RUNNERS[defence](seed, SCENARIOS[scenario](seed))
                results.setdefault((scenario, defence), []).append(row)
                print(scenario, defence, seed, {k: round(v, 4) for k, v in row.items()}, flush=True)
    if args.save:
        save(args.save, args.seeds, results)
    publish(table(results, args.seeds), DOC, MARK, args.no_doc)


if __name__ == "__main__":
    main()
