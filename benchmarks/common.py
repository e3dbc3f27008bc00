"""What the benchmarks share: a quiet CPU Trainer, the results file and the table in the docs."""

from __future__ import annotations

import json
import logging
import os
import statistics
import tempfile
import warnings
from pathlib import Path

import lightning.pytorch as pl
import torch

SCRATCH = Path(tempfile.gettempdir()) / "robust-lightning-benchmark"


def quiet() -> None:
    """One thread per run (the figures are ratios on a shared machine) and no chatter."""
    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "1")))
    logging.getLogger("lightning").setLevel(logging.ERROR)
    logging.getLogger("robust_lightning").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore")


def trainer(epochs: int, callbacks=()) -> pl.Trainer:
    return pl.Trainer(
        max_epochs=epochs,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=list(callbacks),
        default_root_dir=SCRATCH,  # files callbacks write (flagged.csv), away from the working folder
    )


def mean(rows: list[dict], key: str) -> float | None:
    values = [row[key] for row in rows if key in row]
    return statistics.fmean(values) if values else None


def save(path: Path, seeds: list[int], results: dict[tuple[str, str], list[dict]]) -> None:
    path.write_text(json.dumps({"seeds": seeds, "results": {" | ".join(k): v for k, v in results.items()}}))


def load(paths: list[Path]) -> tuple[dict[tuple[str, str], list[dict]], list[int]]:
    """Rows saved by :func:`save`, from runs made in parallel or one after another, as one result set."""
    saved = [json.loads(path.read_text()) for path in paths]
    results: dict[tuple[str, str], list[dict]] = {}
    for part in saved:
        for key, rows in part["results"].items():
            results.setdefault(tuple(key.split(" | ")), []).extend(rows)
    return results, sorted({seed for part in saved for seed in part["seeds"]})


def publish(text: str, doc: Path, mark: str, print_only: bool) -> None:
    """Print a benchmark's table and, unless ``print_only``, put it into its doc."""
    print(text)
    if not print_only:
        write_doc(doc, mark, text)


def write_doc(doc: Path, mark: str, text: str) -> None:
    """Replace what lies between the two ``mark`` lines of ``doc`` with ``text``."""
    content = doc.read_text()
    start, end = content.index(mark) + len(mark), content.rindex(mark)
    doc.write_text(content[:start] + "\n" + text + "\n" + content[end:])
