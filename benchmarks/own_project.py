"""A module with no validation_step, filtered on 28x28 inputs: the filter reads the trusted split itself.

The recipes' filter (filter=default) on warped 28x28 digits with a 40% pair flip, trained by a
SmallCNN whose validation_step is removed, against the same run without the filter.

    python benchmarks/own_project.py                  # 20,000 samples, 20 epochs; writes docs/pages/own-project.md
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from common import publish, quiet
from end_to_end import run

DOC = Path(__file__).resolve().parents[1] / "docs" / "pages" / "own-project.md"
MARK = "<!-- no validation_step benchmark -->"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train", type=int, default=20_000, help="training samples")
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--no-doc", action="store_true", help="print the table without writing the docs")
    args = parser.parse_args()
    quiet()
    none, default = (run("NoValidationCNN", option, args.epochs, 28, args.train) for option in ("none", "default"))
    threads = torch.get_num_threads()
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"{threads} CPU thread{'s' * (threads > 1)}"
    text = "\n".join(
        [
            "| filter | test accuracy | precision | recall | F1 |",
            "|---|---|---|---|---|",
            f"| none | {none['acc']:.1%} | | | |",
            (
                f"| default | {default['acc']:.1%} | {default['precision']:.2f} "
                f"| {default['recall']:.2f} | {default['f1']:.2f} |"
            ),
            (
                f"\n{args.train:,} training samples of 28x28, pair flip 40%, {args.epochs} epochs, batch 256, on {device}. "
                f"Command: `python benchmarks/own_project.py --train {args.train} --epochs {args.epochs}`."
            ),
        ]
    )
    publish(text, DOC, MARK, args.no_doc)


if __name__ == "__main__":
    main()
