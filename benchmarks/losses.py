"""Label-noise-robust losses on the bundled digits: every loss against cross-entropy, side by side.

Every run trains the same SmallCNN (Adam 3e-3, batch 64) on the same split with the loss swapped in
by RobustLoss, each loss at its one documented default (conf/loss/); only the loss changes, and
the losses alternate within each seed. Test accuracy is that of the last epoch: no early stopping
on the noisy validation split.

    python benchmarks/losses.py --epochs 100    # 3 seeds, all scenarios and losses; writes docs/pages/losses.md
    python benchmarks/losses.py --epochs 40
    python benchmarks/losses.py --seeds 0 --losses ce elr --scenarios "symmetric 40%" --no-doc
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import lightning.pytorch as pl
from common import load, mean, publish, quiet, save, trainer
from hydra.utils import instantiate
from omegaconf import OmegaConf

from robust_lightning import RobustDataModule
from robust_lightning.callbacks import RobustLoss
from robust_lightning.data import DigitsDataModule
from robust_lightning.models import SmallCNN
from robust_lightning.poison import PairFlip, SymmetricNoise

ROOT = Path(__file__).resolve().parents[1]
SCENARIOS: dict[str, Callable[[int], object]] = {
    "symmetric 20%": lambda seed: SymmetricNoise(rate=0.2, seed=seed),
    "symmetric 40%": lambda seed: SymmetricNoise(rate=0.4, seed=seed),
    "symmetric 60%": lambda seed: SymmetricNoise(rate=0.6, seed=seed),
    "pair flip 40%": lambda seed: PairFlip({4: 8, 8: 4, 6: 9, 9: 6}, rate=0.4, seed=seed),
}
LOSS_NAMES = ["ce", "gce", "sce", "nce_rce", "bootstrap_soft", "bootstrap_hard", "taylor", "elr", "forward"]
BUDGETS = (40, 100)  # the recipes' default, and long enough for cross-entropy to memorize the noise
DOC = ROOT / "docs" / "pages" / "losses.md"


def mark(epochs: int) -> str:
    return f"<!-- losses benchmark table, {epochs} epochs -->"


def build_loss(name: str):
    """The loss exactly as the ``loss`` config group builds it."""
    config = OmegaConf.merge({"num_classes": 10}, {"loss": OmegaConf.load(ROOT / "conf" / "loss" / f"{name}.yaml")})
    return instantiate(config.loss)


def run(seed: int, poison, loss_name: str, epochs: int) -> dict:
    pl.seed_everything(seed, verbose=False)
    data = RobustDataModule(DigitsDataModule(), poison=poison, seed=seed, validate=False)
    model = SmallCNN()
    start = time.perf_counter()
    fit_trainer = trainer(epochs, [RobustLoss(build_loss(loss_name))])
    fit_trainer.fit(model, datamodule=data)
    seconds = time.perf_counter() - start
    return {"acc": fit_trainer.test(model, datamodule=data, verbose=False)[0]["test/acc"], "seconds": seconds}


def table(results: dict[tuple[str, str], list[dict]], seeds: list[int], epochs: int) -> str:
    scenarios = [s for s in SCENARIOS if any(key[0] == s for key in results)]
    losses = [name for name in LOSS_NAMES if any(key[1] == name for key in results)]
    lines = [
        (
            f"Test accuracy (%), mean ± standard deviation over seeds {seeds}, after {epochs} epochs; in brackets "
            "the difference from cross-entropy; time is wall time relative to cross-entropy, over all scenarios."
        ),
        "",
        "| loss | " + " | ".join(scenarios) + " | time |",
        "|---" * (len(scenarios) + 2) + "|",
    ]
    for name in losses:
        cells = []
        for scenario in scenarios:
            accs = [100 * row["acc"] for row in results.get((scenario, name), [])]
            base = mean(results.get((scenario, "ce"), []), "acc")
            if not accs:
                cells.append("—")
                continue
            cell = f"{statistics.fmean(accs):.1f} ± {statistics.pstdev(accs):.1f}"
            if name != "ce" and base is not None:
                cell += f" ({statistics.fmean(accs) - 100 * base:+.1f})"
            cells.append(cell)
        seconds = [mean(results[(s, name)], "seconds") for s in scenarios if (s, name) in results]
        base_seconds = [mean(results[(s, "ce")], "seconds") for s in scenarios if (s, "ce") in results]
        ratio = sum(seconds) / sum(base_seconds) if base_seconds and len(base_seconds) == len(seconds) else None
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {'—' if ratio is None else f'{ratio:.2f}x'} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--scenarios", nargs="+", default=list(SCENARIOS), choices=list(SCENARIOS))
    parser.add_argument("--losses", nargs="+", default=LOSS_NAMES, choices=LOSS_NAMES)
    parser.add_argument("--epochs", type=int, default=BUDGETS[1], choices=BUDGETS)
    parser.add_argument("--no-doc", action="store_true", help="print the table without writing docs/pages/losses.md")
    parser.add_argument("--save", type=Path, help="also save the raw rows as JSON, to merge runs made in parallel")
    parser.add_argument("--merge", type=Path, nargs="+", help="render the table from saved JSON files instead")
    args = parser.parse_args()
    if args.merge:
        return publish(table(*load(args.merge), args.epochs), DOC, mark(args.epochs), args.no_doc)
    quiet()
    results: dict[tuple[str, str], list[dict]] = {}
    for scenario in args.scenarios:
        for seed in args.seeds:
            for name in args.losses:  # alternating, so that drift in machine load hits every loss alike
                row = run(seed, SCENARIOS[scenario](seed), name, args.epochs)
                results.setdefault((scenario, name), []).append(row)
                print(scenario, name, seed, {k: round(v, 4) for k, v in row.items()}, flush=True)
    if args.save:
        save(args.save, args.seeds, results)
    publish(table(results, args.seeds, args.epochs), DOC, mark(args.epochs), args.no_doc)


if __name__ == "__main__":
    main()
