"""The recipe catalogue and the defence sweep: Hydra multiruns whose summaries go into docs/pages/cli.md.

1. ``robust-lightning -m recipe=<every digits recipe>``: one job per recipe, at its own settings.
2. ``robust-lightning -m recipe=digits_sym40 poison.rate=0.2,0.4,0.6 filter=none,default``: the
   filter against no filter across noise rates, as one summary table (summary.md of the sweep).

    python benchmarks/catalogue.py           # both sweeps (about 15 minutes on 2 cores); writes docs/pages/cli.md
    python benchmarks/catalogue.py --no-doc  # print the tables only
"""

from __future__ import annotations

import argparse
import csv
import shutil
import subprocess
import sys
from pathlib import Path

import yaml
from common import SCRATCH, publish

ROOT = Path(__file__).resolve().parents[1]
PAGE = ROOT / "docs" / "pages" / "cli.md"
CATALOGUE_MARK, SWEEP_MARK = "<!-- recipe catalogue -->", "<!-- defence sweep -->"
# Recipes that download data, and the loss sweep, which is itself a multirun, are left out.
SKIPPED = {"mnist_pgd_at", "cifar10_pgd_at", "digits_loss_sweep"}
RECIPES = sorted(p.stem for p in (ROOT / "recipes").glob("*.yaml") if p.stem not in SKIPPED)
SWEEP = ["recipe=digits_sym40", "poison.rate=0.2,0.4,0.6", "filter=none,default"]


def multirun(overrides: list[str], folder: Path) -> Path:
    """Run ``robust-lightning -m`` with ``overrides`` into ``folder``; return the folder."""
    shutil.rmtree(folder, ignore_errors=True)
    command = shutil.which("robust-lightning", path=str(Path(sys.executable).parent)) or "robust-lightning"
    extra = ["trainer.enable_progress_bar=false", f"hydra.sweep.dir={folder}"]
    subprocess.run([command, "-m", *overrides, *extra], cwd=SCRATCH, check=True, capture_output=True, text=True)
    return folder


def _percent(row: dict, key: str) -> str:
    return f"{100 * float(row[key]):.1f}%" if row.get(key) else ""


def catalogue_table(folder: Path) -> str:
    rows = {row["recipe"]: row for row in csv.DictReader((folder / "summary.csv").open())}
    lines = [
        "| recipe | purpose | test accuracy | more |",
        "|---|---|---|---|",
    ]
    for recipe in RECIPES:
        row = rows[recipe]
        purpose = yaml.safe_load((ROOT / "recipes" / f"{recipe}.yaml").read_text())["purpose"]
        more = []
        if row.get("test/robust_accuracy/macro"):
            more.append(f"robust accuracy (PGD-20) {_percent(row, 'test/robust_accuracy/macro')}")
        if row.get("test/attack_success_rate"):
            more.append(f"attack success rate {_percent(row, 'test/attack_success_rate')}")
        lines.append(f"| `{recipe}` | {purpose} | {_percent(row, 'test/acc')} | {'; '.join(more)} |")
    command = f"robust-lightning -m recipe={','.join(RECIPES)}"
    return "\n".join(lines) + f"\n\nMeasured by one multirun, seed 0, 2 CPU cores: `{command}`."


def sweep_table(folder: Path) -> str:
    title, table = (folder / "summary.md").read_text().strip().split("\n", 1)
    return f"{title}, from `summary.md` of `robust-lightning -m {' '.join(SWEEP)}`:\n\n{table}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--no-doc", action="store_true", help="print the tables only")
    args = parser.parse_args()
    SCRATCH.mkdir(parents=True, exist_ok=True)
    catalogue = multirun([f"recipe={','.join(RECIPES)}"], SCRATCH / "catalogue")
    publish(catalogue_table(catalogue), PAGE, CATALOGUE_MARK, args.no_doc)
    sweep = multirun(SWEEP, SCRATCH / "defence_sweep")
    publish(sweep_table(sweep), PAGE, SWEEP_MARK, args.no_doc)


if __name__ == "__main__":
    main()
