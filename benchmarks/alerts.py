"""PerClassMetrics' class alerts on the bundled digits: how many a clean run raises, and a poisoned one.

Each run trains SmallCNN for 40 epochs (Adam 1e-3, batch 64) with PerClassMetrics at its defaults
(alerts after 10 validation epochs; margin 0.1 on recall and precision, 0.5 on the prediction
share, at least 5 samples). A targeted flip relabels 40% of the 4s as 8; the pair flip is the
default recipe's 4<->8, 6<->9 at 40%.

    python benchmarks/alerts.py          # 3 seeds per scenario; writes docs/pages/monitoring.md
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from pathlib import Path

from common import publish, quiet, trainer
from lightning.pytorch import seed_everything

from robust_lightning import RobustDataModule
from robust_lightning.callbacks import PerClassMetrics
from robust_lightning.data import DigitsDataModule
from robust_lightning.models import SmallCNN
from robust_lightning.poison import PairFlip

EPOCHS = 40
DOC = Path(__file__).resolve().parents[1] / "docs" / "pages" / "monitoring.md"
MARK = "<!-- alerts benchmark table -->"
RESULTS = Path(__file__).resolve().parent / "results" / "alerts.json"
SCENARIOS = {
    "clean": None,
    "targeted flip 4 -> 8, 40%": PairFlip({4: 8}, rate=0.4),
    "pair flip 4<->8, 6<->9, 40%": PairFlip({4: 8, 8: 4, 6: 9, 9: 6}, rate=0.4),
}


def run(poison: PairFlip | None, seed: int) -> dict:
    seed_everything(seed, workers=True)
    metrics = PerClassMetrics(num_classes=10)
    data = RobustDataModule(DigitsDataModule(seed=seed), poison=poison, seed=seed)
    trainer(EPOCHS, [metrics]).fit(SmallCNN(), datamodule=data)
    alerts = [(record["epoch"], alert) for record in metrics.history for alert in record.get("alerts", [])]
    classes = Counter(alert.split("'")[1] for _, alert in alerts)
    return {"seed": seed, "alerts": len(alerts), "epochs_with_alerts": len({e for e, _ in alerts}), "classes": classes}


def table(results: dict[str, list[dict]]) -> str:
    lines = [
        "| scenario | seeds | alerts per run | epochs with an alert (of 30 watched) | classes named most |",
        "|---|---|---|---|---|",
    ]
    for name, rows in results.items():
        classes = sum((Counter(row["classes"]) for row in rows), Counter())
        named = ", ".join(f"{c} ({n})" for c, n in classes.most_common(4)) or "none"
        lines.append(
            f"| {name} | {len(rows)} | {', '.join(str(r['alerts']) for r in rows)} "
            f"| {', '.join(str(r['epochs_with_alerts']) for r in rows)} | {named} |"
        )
    return "\n".join(lines) + "\n\nRegenerate with `python benchmarks/alerts.py` (about 4 minutes on one core)."


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--no-doc", action="store_true", help="print the table only")
    args = parser.parse_args()
    quiet()
    results = {name: [run(poison, seed) for seed in range(args.seeds)] for name, poison in SCENARIOS.items()}
    if not args.no_doc:
        RESULTS.write_text(json.dumps(results, indent=1))
    publish(table(results), DOC, MARK, args.no_doc)


if __name__ == "__main__":
    main()
