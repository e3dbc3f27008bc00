"""DriftMonitor on the bundled digits: false alarms on i.i.d. data, and detection of two real shifts.

- ``iid``: SmallCNN trained 40 epochs on a clean split (the split and the model seeded alike);
  DriftMonitor tests the validation set against a random training sample every 10 epochs. A
  false alarm is a flag on the validation set. The same runs test the validation set with
  additive Gaussian noise (sigma 0.1) as the ``noise`` loader.
- ``backdoor``: BadNets 10%, PoisonFilter with a full restart (``restart="model"``, the setting the
  table was measured with);
  DriftMonitor tests the triggered test set (non-target test digits with the patch) as ``triggered``.

    python benchmarks/drift.py                 # 20 i.i.d. seeds, 3 backdoor seeds; writes docs/pages/monitoring.md
    python benchmarks/drift.py --iid-seeds 2 --backdoor-seeds 1 --no-doc
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch
from common import publish, quiet, trainer
from lightning.pytorch import seed_everything
from torch.utils.data import DataLoader, TensorDataset

from robust_lightning import RobustDataModule
from robust_lightning.callbacks import DriftMonitor, PoisonFilter
from robust_lightning.data import DigitsDataModule
from robust_lightning.models import SmallCNN
from robust_lightning.poison import BackdoorTrigger

EPOCHS, EVERY, SIGMA = 40, 10, 0.1
DOC = Path(__file__).resolve().parents[1] / "docs" / "pages" / "monitoring.md"
MARK = "<!-- drift benchmark table -->"
RESULTS = Path(__file__).resolve().parent / "results" / "drift.json"


def noisy(dataset: TensorDataset, seed: int) -> DataLoader:
    x, y = dataset.tensors
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(seed)) * SIGMA
    return DataLoader(TensorDataset(x + noise, y), batch_size=256)


def last(monitor: DriftMonitor, name: str) -> dict:
    return [record for record in monitor.history if record["name"] == name][-1]


def iid_run(seed: int) -> dict:
    seed_everything(seed, workers=True)
    data = DigitsDataModule(seed=seed)
    data.setup("fit")
    monitor = DriftMonitor(every_n_epochs=EVERY, dataloaders={"noise": noisy(data.val_set, seed)}, seed=seed)
    trainer(EPOCHS, [monitor]).fit(SmallCNN(), datamodule=data)
    val = [record for record in monitor.history if record["name"] == "val"]
    return {
        "seed": seed,
        "val_final_flag": last(monitor, "val")["drift"],
        "val_any_flag": any(record["drift"] for record in val),
        "val_p": {test: p for test, (_, p) in last(monitor, "val")["tests"].items()},
        "noise_flag": last(monitor, "noise")["drift"],
        "noise_p": {test: p for test, (_, p) in last(monitor, "noise")["tests"].items()},
    }


def backdoor_run(seed: int) -> dict:
    seed_everything(seed, workers=True)
    digits = DigitsDataModule()
    digits.setup("test")
    poison = BackdoorTrigger(target=0, rate=0.1, seed=seed)
    data = RobustDataModule(digits, poison=poison)
    data.setup("fit")  # the drill's trigger is ready once the train split is read
    triggered = DataLoader(poison.triggered(digits.test_set), batch_size=256)
    monitor = DriftMonitor(every_n_epochs=EPOCHS, dataloaders={"triggered": triggered}, seed=seed)
    model = SmallCNN()
    trainer(EPOCHS, [PoisonFilter(restart="model"), monitor]).fit(model, datamodule=data)
    record = last(monitor, "triggered")
    return {
        "seed": seed,
        "triggered_flag": record["drift"],
        "triggered_p": {test: p for test, (_, p) in record["tests"].items()},
        "asr": poison.attack_success_rate(model, digits.test_set),
    }


def table(iid: list[dict], backdoor: list[dict]) -> str:
    tests = ("inputs", "embedding_ks", "embedding_mmd", "labels", "predictions")

    def median_p(rows: list[dict], key: str) -> list[str]:
        return [f"{statistics.median(row[key][t] for row in rows):.2g}" for t in tests]

    header = "| current data | runs | flagged (p < 0.01) | median p: inputs KS | embeddings KS | embeddings MMD "
    rows = [
        ("validation, i.i.d. (last check)", iid, "val_final_flag", median_p(iid, "val_p")),
        (f"validation, i.i.d. (any of {EPOCHS // EVERY} checks)", iid, "val_any_flag", [""] * 5),
        (f"validation + N(0, {SIGMA}²) noise", iid, "noise_flag", median_p(iid, "noise_p")),
    ]
    lines = [header + "| labels χ² | predictions χ² |", "|---|---|---|---|---|---|---|---|"]
    lines += [f"| {name} | {len(r)} | {sum(x[flag] for x in r)} | {' | '.join(p)} |" for name, r, flag, p in rows]
    if backdoor:
        asr = statistics.fmean(r["asr"] for r in backdoor)
        lines.append(
            f"| BadNets-triggered test set (filtered model, ASR {100 * asr:.1f}%) | {len(backdoor)} "
            f"| {sum(r['triggered_flag'] for r in backdoor)} | {' | '.join(median_p(backdoor, 'triggered_p'))} |"
        )
    command = "python benchmarks/drift.py"
    return "\n".join(lines) + f"\n\nRegenerate with `{command}` (about 6 minutes on one core)."


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iid-seeds", type=int, default=20)
    parser.add_argument("--backdoor-seeds", type=int, default=3)
    parser.add_argument("--no-doc", action="store_true", help="print the table only")
    args = parser.parse_args()
    quiet()
    iid = [iid_run(seed) for seed in range(args.iid_seeds)]
    backdoor = [backdoor_run(seed) for seed in range(args.backdoor_seeds)]
    if not args.no_doc:
        RESULTS.write_text(json.dumps({"iid": iid, "backdoor": backdoor}, indent=1))
    publish(table(iid, backdoor), DOC, MARK, args.no_doc)


if __name__ == "__main__":
    main()
