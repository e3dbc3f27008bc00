"""Auditing a model already trained on the digits: robust_lightning.audit against cleanlab's 5-fold cleaning.

Both start from the same poisoned training set. The audit reads a SmallCNN trained once with plain
cross-entropy and no callbacks (its training time is not counted: the model exists already);
cleanlab needs out-of-sample probabilities, from 5 trainings on 4/5 of the data each, then
``find_label_issues``. F1 is against the drill's ground truth.

    pip install -e ".[bench]"
    python benchmarks/audit.py                 # seeds 0-2, pair flip and symmetric 40%; writes docs/pages/filtering.md
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

from common import mean, publish, quiet
from filtering import SCENARIOS, cleanlab_flags, fit

from robust_lightning import RobustDataModule, audit
from robust_lightning.data import DigitsDataModule
from robust_lightning.detectors import detection_quality

DOC = Path(__file__).resolve().parents[1] / "docs" / "pages" / "filtering.md"
MARK = "<!-- audit benchmark table -->"


def run_audit(seed: int, poison) -> dict:
    model, data, _ = fit(seed, poison)
    start = time.perf_counter()
    found = audit(model, data, accelerator="cpu")
    return {"seconds": time.perf_counter() - start, **found.quality}


def run_cleanlab(seed: int, poison) -> dict:
    start = time.perf_counter()
    flagged = cleanlab_flags(seed, poison)
    truth = RobustDataModule(DigitsDataModule(), poison=poison, seed=seed)
    truth.setup("fit")
    return {"seconds": time.perf_counter() - start, **detection_quality(flagged, truth.poison_mask)}


def table(results: dict[tuple[str, str], list[dict]], seeds: list[int]) -> str:
    lines = [
        f"Means over seeds {seeds}; time is wall time of the method alone, on one CPU thread.",
        "",
        "| scenario | method | precision | recall | F1 | time | trainings |",
        "|---|---|---|---|---|---|---|",
    ]
    for (scenario, method), rows in results.items():
        trainings = "0 (reads the trained model)" if method == "audit" else "5"
        lines.append(
            f"| {scenario} | {method} | {mean(rows, 'precision'):.2f} | {mean(rows, 'recall'):.2f} | "
            f"{mean(rows, 'f1'):.2f} | {mean(rows, 'seconds'):.1f} s | {trainings} |"
        )
    audit_time = statistics.fmean(r["seconds"] for (_, m), rows in results.items() if m == "audit" for r in rows)
    cleanlab_time = statistics.fmean(r["seconds"] for (_, m), rows in results.items() if m == "cleanlab" for r in rows)
    lines.append(f"\nThe audit takes {audit_time / cleanlab_time:.1%} of cleanlab's wall time. "
                 "Command: `python benchmarks/audit.py`.")  # fmt: skip
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--no-doc", action="store_true", help="print the table without writing docs/pages/filtering.md")
    args = parser.parse_args()
    quiet()
    results: dict[tuple[str, str], list[dict]] = {}
    for scenario in ("pair flip 40%", "symmetric 40%"):
        for seed in args.seeds:
            for method, runner in (("audit", run_audit), ("cleanlab", run_cleanlab)):
                row = runner(seed, SCENARIOS[scenario](seed))
                results.setdefault((scenario, method), []).append(row)
                print(scenario, method, seed, {k: round(v, 4) for k, v in row.items()}, flush=True)
    publish(table(results, args.seeds), DOC, MARK, args.no_doc)


if __name__ == "__main__":
    main()
