"""Regularization and augmentation defences on the bundled digits, side by side, and the biased-injection drill.

- ``symmetric 40%``, at 100 epochs (where cross-entropy memorizes the noise) and at 40: 40% of the
  training labels moved at random. Plain cross-entropy against mixup (alpha 1), label smoothing (0.1),
  weight decay (5e-4), the best robust loss (ELR) and mixup with ELR. At 200 epochs, where mixup
  has converged: CE, ELR and each with mixup.
- ``injection 30%``, at 40 epochs: ClassInjection adds 30% of the training set's size as near-copies (noise std
  0.03) of class 0. Clean training against no defence, ClassBalance (reweighting), PoisonFilter with
  the near-duplicate detector (exclude), and both. Near-duplicate detection is also measured on the
  inputs alone, before training.

Every run: SmallCNN (Adam 3e-3, batch 64), the seed's own split; test metrics of the last epoch.

    python benchmarks/regularization.py              # 3 seeds, every scenario; writes docs/pages/regularization.md
    python benchmarks/regularization.py --scenario "symmetric 40%, 100 epochs" --methods CE "mixup + CE" --save a.json
    python benchmarks/regularization.py --merge a.json b.json    # publish rows saved by runs made in parallel
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections.abc import Callable
from pathlib import Path

import lightning.pytorch as pl
import torch
from common import publish, quiet, trainer
from torch import nn

from robust_lightning import RobustDataModule
from robust_lightning.callbacks import ClassBalance, Mixup, PerClassMetrics, PoisonFilter, RobustLoss
from robust_lightning.data import DigitsDataModule
from robust_lightning.detectors import NearDuplicates, detection_quality, near_duplicates
from robust_lightning.losses import ELRLoss
from robust_lightning.models import SmallCNN
from robust_lightning.poison import ClassInjection, SymmetricNoise

MIXUP_ALPHA = 1.0
SCENARIOS = {
    "symmetric 40%, 200 epochs": 200,
    "symmetric 40%, 100 epochs": 100,
    "symmetric 40%, 40 epochs": 40,
    "injection 30%, 40 epochs": 40,
}
# Mixup converges more slowly than plain training (Zhang et al. train 200 epochs): the longest
# scenario runs only the rows that compare mixing with training without it.
SCENARIO_METHODS = {"symmetric 40%, 200 epochs": ["CE", "mixup + CE", "ELR", "mixup + ELR"]}
DOC = Path(__file__).resolve().parents[1] / "docs" / "pages" / "regularization.md"
MARK = "<!-- regularization benchmark table -->"
RESULTS = Path(__file__).resolve().parent / "results" / "regularization.json"


def near_duplicate_filter() -> PoisonFilter:
    return PoisonFilter(
        screen=[NearDuplicates()], detectors=[NearDuplicates()], start_epoch=1, every_n_epochs=1, restart=None
    )


# name -> (callbacks, model keyword arguments)
NOISE: dict[str, Callable[[], tuple[list, dict]]] = {
    "CE": lambda: ([], {}),
    "mixup + CE": lambda: ([Mixup(MIXUP_ALPHA)], {}),
    "label smoothing 0.1": lambda: ([RobustLoss(nn.CrossEntropyLoss(label_smoothing=0.1))], {}),
    "weight decay 5e-4": lambda: ([], {"weight_decay": 5e-4}),
    "ELR": lambda: ([RobustLoss(ELRLoss(num_classes=10))], {}),
    "mixup + ELR": lambda: ([RobustLoss(ELRLoss(num_classes=10)), Mixup(MIXUP_ALPHA)], {}),
}
INJECTION: dict[str, Callable[[], tuple[list, dict]]] = {
    "clean (no injection)": lambda: ([], {}),
    "injected, no defence": lambda: ([], {}),
    "injected + ClassBalance": lambda: ([ClassBalance()], {}),
    "injected + near-duplicate filter": lambda: ([near_duplicate_filter()], {}),
    "injected + filter + ClassBalance": lambda: ([near_duplicate_filter(), ClassBalance()], {}),
}


def run(seed: int, poison, callbacks: list, model_kwargs: dict, epochs: int) -> dict:
    pl.seed_everything(seed, verbose=False)
    data = RobustDataModule(DigitsDataModule(seed=seed), poison=poison, seed=seed, validate=False)
    metrics = PerClassMetrics(num_classes=10)
    model = SmallCNN(**model_kwargs)
    fit_trainer = trainer(epochs, [metrics, *callbacks])
    fit_trainer.fit(model, datamodule=data)
    results = fit_trainer.test(model, datamodule=data, verbose=False)[0]
    row = {"acc": results["test/acc"], "macro_recall": results["test/recall/macro"]}
    flt = next((c for c in callbacks if isinstance(c, PoisonFilter)), None)
    if flt is not None and data.poison_mask is not None:
        row.update(detection_quality(flt.flags, data.poison_mask))
        row["clean_flagged"] = float(flt.flags[~data.poison_mask].float().mean())
    return row


def input_detection(seed: int) -> dict:
    """Near-duplicate detection on the raw training inputs, before any training."""
    data = RobustDataModule(DigitsDataModule(seed=seed), poison=ClassInjection(0, 0.3, seed=seed), validate=False)
    data.setup("fit")
    inputs = torch.stack([data.training_sample(i)[0] for i in range(data.num_train)])
    flags = near_duplicates(inputs).flags
    return {
        **detection_quality(flags, data.poison_mask),
        "clean_flagged": float(flags[~data.poison_mask].float().mean()),
    }


def scenario_rows(name: str, seeds: list[int], methods: list[str] | None) -> dict[str, list[dict]]:
    rows: dict[str, list[dict]] = {}
    noise = name.startswith("symmetric")
    methods = methods or SCENARIO_METHODS.get(name)
    configs = {m: build for m, build in (NOISE if noise else INJECTION).items() if not methods or m in methods}
    for seed in seeds:
        for method, build in configs.items():
            callbacks, model_kwargs = build()
            if noise:
                poison = SymmetricNoise(rate=0.4, seed=seed)
            else:
                poison = None if method.startswith("clean") else ClassInjection(0, 0.3, seed=seed)
            row = run(seed, poison, callbacks, model_kwargs, SCENARIOS[name])
            rows.setdefault(method, []).append({"seed": seed, **row})
        if not noise and not methods:
            rows.setdefault("near-duplicates on inputs (no training)", []).append(
                {"seed": seed, **input_detection(seed)}
            )
    return rows


def _cell(rows: list[dict], key: str, scale: float = 100, digits: int = 1) -> str:
    values = [row[key] * scale for row in rows if key in row]
    if not values:
        return ""
    spread = f" ± {statistics.stdev(values):.{digits}f}" if len(values) > 1 else ""
    return f"{statistics.fmean(values):.{digits}f}{spread}"


def table(results: dict[str, dict[str, list[dict]]]) -> str:
    lines = []
    for name, methods in results.items():
        if name.startswith("symmetric"):
            lines += [f"{name.capitalize()}; test metrics in %, mean ± std over seeds:", ""]
            lines += ["| method | accuracy | macro recall |", "|---|---|---|"]
            lines += [f"| {m} | {_cell(r, 'acc')} | {_cell(r, 'macro_recall')} |" for m, r in methods.items()]
        else:
            title = (
                f"ClassInjection, 30% near-copies of class 0, {name.split(', ')[1]}; test metrics in %; detection "
                "against the drill's ground truth (the filter's, after its last round):"
            )
            lines += [
                title,
                "",
                "| method | accuracy | macro recall | detection precision | recall | clean samples flagged (%) |",
                "|---|---|---|---|---|---|",
            ]
            for method, rows in methods.items():
                lines.append(
                    f"| {method} | {_cell(rows, 'acc')} | {_cell(rows, 'macro_recall')} "
                    f"| {_cell(rows, 'precision', 1, 3)} | {_cell(rows, 'recall', 1, 3)} "
                    f"| {_cell(rows, 'clean_flagged', 100, 2)} |"
                )
        lines.append("")
    return "\n".join(lines) + "Regenerate with `python benchmarks/regularization.py` (about 65 minutes on one core)."


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--scenario", choices=list(SCENARIOS), nargs="+", default=list(SCENARIOS))
    parser.add_argument("--methods", nargs="+", help="run only these rows of the scenarios")
    parser.add_argument("--save", type=Path, help="write the rows (with --merge: the merged rows) to this file")
    parser.add_argument("--merge", type=Path, nargs="+", help="publish rows saved by earlier runs instead of running")
    parser.add_argument("--no-doc", action="store_true", help="print the table only")
    args = parser.parse_args()
    quiet()
    if args.merge:
        results: dict[str, dict[str, list[dict]]] = {}
        for path in args.merge:
            for name, methods in json.loads(path.read_text()).items():
                for method, rows in methods.items():
                    results.setdefault(name, {}).setdefault(method, []).extend(rows)
        results = {name: results[name] for name in SCENARIOS if name in results}
        if args.save:
            args.save.write_text(json.dumps(results, indent=1))
    else:
        results = {name: scenario_rows(name, args.seeds, args.methods) for name in args.scenario}
        (args.save or RESULTS).write_text(json.dumps(results, indent=1))
    publish(table(results), DOC, MARK, args.no_doc)


if __name__ == "__main__":
    main()
