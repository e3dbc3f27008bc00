"""Plain-text tables for the terminal."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from robust_lightning.callbacks.per_class_metrics import METRICS


def format_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """Right-aligned columns separated by two spaces.

    >>> print(format_table(["a", "bb"], [[1, 2.5]]))
    a   bb
    1  2.5
    """
    cells = [[str(c) for c in header]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    lines = ["  ".join(cell.rjust(width) for cell, width in zip(row, widths)) for row in cells]
    return "\n".join(lines)


def per_class_table(record: dict[str, Any], class_names: Sequence[str], poisoned: Sequence[int] | None = None) -> str:
    """The per-class table of one :class:`~robust_lightning.callbacks.PerClassMetrics` record, in percent.

    ``poisoned`` adds a column with the number of training samples of each class that a drill changed.

    >>> record = {"accuracy": [1.0, 0.5], "precision": [0.5, 1.0], "recall": [1.0, 0.5], "f1": [0.6667, 0.6667], "support": [2, 2]}
    >>> print(per_class_table(record, ["cat", "dog"], poisoned=[0, 3]))
    class  accuracy  precision  recall    f1  support  poisoned in train
      cat     100.0       50.0   100.0  66.7        2                  0
      dog      50.0      100.0    50.0  66.7        2                  3
    """
    header = ["class", *METRICS, "support"] + (["poisoned in train"] if poisoned is not None else [])
    rows = []
    for c, name in enumerate(class_names):
        row = [name, *(f"{100 * record[m][c]:.1f}" for m in METRICS), record["support"][c]]
        rows.append(row + ([poisoned[c]] if poisoned is not None else []))
    return format_table(header, rows)
