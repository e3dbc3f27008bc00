"""Two DDP processes against one, on the CPU: test accuracy and time per epoch, side by side.

The run combines everything: the default recipe's pair-flip drill (40% of 4<->8, 6<->9), PoisonFilter
(rounds from epoch 2, every 2 epochs, with a full restart, whose extension both runs must apply alike),
RobustLoss(ELR), FGSM-RS adversarial training, PerClassMetrics and DriftMonitor, 12 epochs (10 plus the
restart's 2). One process trains with batches
of 64; two processes (ddp_spawn over gloo) with 32 each, the same global batch. Each process of the
DDP run gets one thread; the single process gets as many as the DDP run in all (BENCH_THREADS x 2).

    python benchmarks/ddp.py                 # seeds 0-2; writes the table into docs/pages/ddp.md
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import lightning.pytorch as pl
import torch
from common import SCRATCH, publish, quiet

from robust_lightning import RobustDataModule
from robust_lightning.callbacks import AdversarialTraining, DriftMonitor, PerClassMetrics, PoisonFilter, RobustLoss
from robust_lightning.data import DigitsDataModule
from robust_lightning.losses import ELRLoss
from robust_lightning.models import SmallCNN
from robust_lightning.poison import PairFlip

DOC = Path(__file__).resolve().parents[1] / "docs" / "pages" / "ddp.md"
MARK = "<!-- ddp benchmark table -->"
RESULTS = Path(__file__).resolve().parent / "results" / "ddp.json"
EPOCHS = 10


class EpochTimes(pl.Callback):
    """Rank zero's seconds per training epoch (validation included), written to a file."""

    def __init__(self, path: str) -> None:
        self.path, self.times = path, []

    def on_train_epoch_start(self, trainer, pl_module):
        self.start = time.perf_counter()

    def on_validation_end(self, trainer, pl_module):
        if not trainer.sanity_checking and trainer.is_global_zero:
            self.times.append(time.perf_counter() - self.start)
            Path(self.path).write_text(json.dumps(self.times))


def run(seed: int, devices: int, folder: Path) -> dict:
    pl.seed_everything(seed, verbose=False)
    times = folder / f"times{devices}.json"
    callbacks = [
        PerClassMetrics(num_classes=10),
        DriftMonitor(every_n_epochs=2, permutations=200),
        PoisonFilter(start_epoch=2, every_n_epochs=2, dirpath=folder, restart="model"),
        AdversarialTraining("fgsm_rs", eps=0.1),
        RobustLoss(ELRLoss(num_classes=10)),
        EpochTimes(str(times)),
    ]
    strategy = "ddp_spawn" if devices > 1 else "auto"
    trainer = pl.Trainer(
        max_epochs=EPOCHS,
        accelerator="cpu",
        devices=devices,
        strategy=strategy,
        callbacks=callbacks,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=folder,
    )
    poison = PairFlip({4: 8, 8: 4, 6: 9, 9: 6}, rate=0.4, seed=seed)
    data = RobustDataModule(DigitsDataModule(batch_size=64 // devices), poison=poison, seed=seed)
    model = SmallCNN()
    trainer.fit(model, datamodule=data)
    test = pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False, enable_model_summary=False)
    accuracy = test.test(model, datamodule=data, verbose=False)[0]["test/acc"]
    epoch_times = json.loads(times.read_text())
    return {"seed": seed, "acc": accuracy, "epoch_seconds": statistics.median(epoch_times[1:])}


def table(rows: list[dict]) -> str:
    def mean(devices: int, key: str) -> float:
        return statistics.fmean(r[key] for r in rows if r["devices"] == devices)

    ratios = [
        b["epoch_seconds"] / a["epoch_seconds"]
        for a in rows
        if a["devices"] == 1
        for b in rows
        if b["devices"] == 2 and b["seed"] == a["seed"]
    ]
    seeds = sorted({r["seed"] for r in rows})
    return "\n".join(
        [
            f"Means over seeds {seeds}; time per epoch is the median over epochs after the first, with validation.",
            "",
            "| run | test accuracy | seconds per epoch |",
            "|---|---|---|",
            f"| 1 process, batch 64 | {100 * mean(1, 'acc'):.1f}% | {mean(1, 'epoch_seconds'):.2f} |",
            f"| 2 DDP processes (gloo), batch 32 each | {100 * mean(2, 'acc'):.1f}% | {mean(2, 'epoch_seconds'):.2f} |",
            "",
            (
                f"Per-epoch time ratio, DDP over one process: {statistics.fmean(ratios):.2f} "
                f"(per seed: {', '.join(f'{r:.2f}' for r in ratios)}). Regenerate with `python benchmarks/ddp.py`."
            ),
        ]
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--no-doc", action="store_true", help="print the table only")
    args = parser.parse_args()
    quiet()
    threads = int(os.environ.get("BENCH_THREADS", "1"))
    os.environ["OMP_NUM_THREADS"] = str(threads)  # read by each spawned DDP process as it starts torch
    rows = []
    SCRATCH.mkdir(parents=True, exist_ok=True)
    for seed in args.seeds:
        for devices in (1, 2):
            torch.set_num_threads(threads * (2 if devices == 1 else 1))
            with tempfile.TemporaryDirectory(dir=SCRATCH) as folder:
                rows.append({"devices": devices, **run(seed, devices, Path(folder))})
    if not args.no_doc:
        RESULTS.write_text(json.dumps(rows, indent=1))
    publish(table(rows), DOC, MARK, args.no_doc)


if __name__ == "__main__":
    main()
