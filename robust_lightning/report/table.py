"""Plain-text tables for the terminal."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any


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


def per_class_table(
    values: Mapping[str, Sequence[float]], class_names: Sequence[str], extra: Mapping[str, Sequence[Any]] | None = None
) -> str:
    """A table with one row per class: each metric of ``values`` in percent, then the ``extra`` columns as given.

    >>> values = {"accuracy": [1.0, 0.5], "f1": [0.6667, 0.6667]}
    >>> print(per_class_table(values, ["cat", "dog"], extra={"poisoned in train": [0, 3]}))
    class  accuracy    f1  poisoned in train
      cat     100.0  66.7                  0
      dog      50.0  66.7                  3
    """
    extra = extra or {}
    header = ["class", *values, *extra]
    rows = [
        [
            name,
            *(f"{100 * float(column[c]):.1f}" for column in values.values()),
            *(column[c] for column in extra.values()),
        ]
        for c, name in enumerate(class_names)
    ]
    return format_table(header, rows)
