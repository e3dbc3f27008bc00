"""The report's figures, each drawn from plain data into a PNG file.

Matplotlib's object API (``Figure``) is used rather than pyplot, so that drawing a report never
touches the global backend or the figures of the user's own session.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib import colormaps, rc_context
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import LogFormatter, MaxNLocator

_DPI = 110


def _literal_text(draw: Callable[..., Path]) -> Callable[..., Path]:
    """Draw with mathtext off: a ``$`` in a class name or title is a dollar sign, not a formula."""

    @functools.wraps(draw)
    def drawn(*args: Any, **kwargs: Any) -> Path:
        with rc_context({"text.parse_math": False}):
            return draw(*args, **kwargs)

    return drawn


def _log_y(axes: Axes) -> None:
    """A log-scale y axis labelled in plain numbers (10, 1e-04): matplotlib's default log labels are
    mathtext, which :func:`_literal_text` turns off, and would show as ``$\\mathdefault{10^{1}}$``."""
    axes.set_yscale("log")
    axes.yaxis.set_major_formatter(LogFormatter())


def _save(figure: Figure, path: Path) -> Path:
    figure.tight_layout()
    figure.savefig(path, dpi=_DPI)
    return path


@_literal_text
def per_class_accuracy(
    history: Sequence[dict[str, Any]], class_names: Sequence[str], path: Path, restarts: Sequence[int] = ()
) -> Path:
    """Validation accuracy of each class across epochs, with the macro mean in black and restarts dashed.

    Example:
        >>> import tempfile
        >>> history = [{"epoch": e, "accuracy": [0.5 + 0.1 * e, 0.9], "macro": {"accuracy": 0.7 + 0.05 * e}}
        ...            for e in range(3)]
        >>> per_class_accuracy(history, ["cat", "dog"], Path(tempfile.mkdtemp()) / "a.png").exists()
        True
    """
    epochs = [record["epoch"] for record in history]
    values = np.array([record["accuracy"] for record in history]) * 100
    macros = [100 * record["macro"]["accuracy"] for record in history]  # as logged: over the classes present
    figure = Figure(figsize=(7, 4))
    axes = figure.add_subplot()
    colours = _class_colours(len(class_names))
    for c, name in enumerate(class_names):
        # Matplotlib leaves labels that start with "_" out of the legend.
        label = f" {name}" if name.startswith("_") else name
        axes.plot(epochs, values[:, c], color=colours[c], label=label, linewidth=1.2)
    axes.plot(epochs, macros, color="black", linewidth=2.2, label="macro")
    for epoch in restarts:
        axes.axvline(epoch, color="gray", linestyle="--", linewidth=1)
    axes.set(xlabel="epoch", ylabel="validation accuracy (%)", title="Per-class validation accuracy")
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes.legend(ncol=2, fontsize=7, loc="lower right")
    axes.grid(alpha=0.3)
    return _save(figure, path)


@_literal_text
def confusion_matrix(confusion: Sequence[Sequence[int]], class_names: Sequence[str], title: str, path: Path) -> Path:
    """Counts with true classes down and predicted classes across; the diagonal is what is right."""
    matrix = np.asarray(confusion)
    size = max(4.0, 0.45 * len(class_names) + 2)
    figure = Figure(figsize=(size, size))
    axes = figure.add_subplot()
    image = axes.imshow(matrix, cmap="Blues")
    figure.colorbar(image, ax=axes, fraction=0.046)
    ticks = range(len(class_names))
    axes.set(xticks=ticks, yticks=ticks, xlabel="predicted", ylabel="true", title=title)
    axes.set_xticklabels(class_names, rotation=90 if len(class_names) > 12 else 0)
    axes.set_yticklabels(class_names)
    if len(class_names) <= 20:
        threshold = matrix.max() / 2
        for (i, j), count in np.ndenumerate(matrix):
            if count:
                colour = "white" if count > threshold else "black"
                axes.text(j, i, str(count), ha="center", va="center", fontsize=7, color=colour)
    return _save(figure, path)


@_literal_text
def score_histogram(
    scores: np.ndarray, poisoned: np.ndarray | None, flagged: np.ndarray, path: Path, title: str = "PoisonFilter scores"
) -> Path:
    """Suspicion scores of the training samples; split by the drill's ground truth when there is one."""
    figure = Figure(figsize=(7, 4))
    axes = figure.add_subplot()
    bins = np.histogram_bin_edges(scores, bins=40)
    if poisoned is None:
        axes.hist(scores, bins=bins, color="tab:blue", label="all samples")
    else:
        axes.hist(scores[~poisoned], bins=bins, color="tab:blue", alpha=0.7, label="clean (ground truth)")
        axes.hist(scores[poisoned], bins=bins, color="tab:red", alpha=0.7, label="poisoned (ground truth)")
    if flagged.any():
        # Outlined, not a threshold line: the detectors flag on their own statistics, so flagged
        # samples need not hold the highest combined scores.
        axes.hist(scores[flagged], bins=bins, histtype="step", color="black", linewidth=1.5, label="flagged")
    axes.set(xlabel="suspicion score", ylabel="training samples", title=title)
    _log_y(axes)
    axes.legend(fontsize=8)
    return _save(figure, path)


@_literal_text
def sample_grid(images: np.ndarray, captions: Sequence[str], title: str, path: Path) -> Path:
    """Images ``(N, C, H, W)`` (C of 1 or 3), each scaled to its own range, with a caption each."""
    count = len(images)
    columns = min(8, count)
    rows = -(-count // columns)
    figure = Figure(figsize=(1.3 * columns, 1.55 * rows + 0.4))
    figure.suptitle(title, fontsize=10)
    for k, (image, caption) in enumerate(zip(images, captions)):
        axes = figure.add_subplot(rows, columns, k + 1)
        low, high = float(image.min()), float(image.max())
        scaled = (image - low) / (high - low) if high > low else image * 0
        axes.imshow(scaled[0] if scaled.shape[0] == 1 else scaled.transpose(1, 2, 0), cmap="gray", vmin=0, vmax=1)
        axes.set_title(caption, fontsize=7)
        axes.axis("off")
    return _save(figure, path)


@_literal_text
def robust_accuracy(
    clean: Sequence[float], robust: Sequence[float], class_names: Sequence[str], title: str, path: Path
) -> Path:
    """Clean and adversarial test accuracy per class, side by side."""
    positions = np.arange(len(class_names))
    figure = Figure(figsize=(max(6.0, 0.5 * len(class_names) + 2), 4))
    axes = figure.add_subplot()
    axes.bar(positions - 0.2, np.asarray(clean) * 100, width=0.4, label="clean", color="tab:blue")
    axes.bar(positions + 0.2, np.asarray(robust) * 100, width=0.4, label="under attack", color="tab:orange")
    axes.set(xticks=positions, ylabel="test accuracy (%)", ylim=(0, 105), title=title)
    axes.set_xticklabels(class_names)
    axes.legend(fontsize=8, loc="lower right")
    axes.grid(axis="y", alpha=0.3)
    return _save(figure, path)


@_literal_text
def training_curves(history: Sequence[dict[str, float]], path: Path) -> Path:
    """Loss and accuracy across epochs: one panel each, a line per metric the run recorded.

    Example:
        >>> import tempfile
        >>> history = [{"epoch": e, "train/loss": 1 / (e + 1), "val/acc": 0.5 + 0.1 * e} for e in range(3)]
        >>> training_curves(history, Path(tempfile.mkdtemp()) / "c.png").exists()
        True
    """
    figure = Figure(figsize=(10, 3.6))
    for place, (kind, label) in enumerate((("loss", "loss"), ("acc", "accuracy")), start=1):
        axes = figure.add_subplot(1, 2, place)
        names = sorted({name for record in history for name in record if name != "epoch" and kind in name})
        for name in names:
            points = [(record["epoch"], record[name]) for record in history if name in record]
            axes.plot(*zip(*points), marker=".", label=name)
        axes.set(xlabel="epoch", ylabel=label, title=f"{label} across epochs")
        axes.xaxis.set_major_locator(MaxNLocator(integer=True))
        axes.grid(alpha=0.3)
        if names:
            axes.legend(fontsize=8)
    return _save(figure, path)


@_literal_text
def drift_statistics(history: Sequence[dict[str, Any]], alpha: float, path: Path) -> Path:
    """Each drift test's p-value across epochs, one panel per monitored dataset, on a log scale."""
    names = list(dict.fromkeys(record["name"] for record in history))
    figure = Figure(figsize=(7, 2.6 * len(names) + 0.4))
    for k, name in enumerate(names):
        records = [record for record in history if record["name"] == name]
        axes = figure.add_subplot(len(names), 1, k + 1)
        epochs = [record["epoch"] for record in records]
        for test in records[0]["tests"]:
            p_values = [max(record["tests"][test][1], 1e-300) for record in records]
            axes.plot(epochs, p_values, marker="o", markersize=3, label=test)
        axes.axhline(alpha / len(records[0]["tests"]), color="red", linestyle="--", label="flag threshold")
        axes.set(ylabel="p-value", title=f"Drift tests on {name!r}")
        _log_y(axes)
        axes.grid(alpha=0.3)
        axes.legend(fontsize=7, ncol=3)
    figure.axes[-1].set_xlabel("epoch")
    return _save(figure, path)


def _class_colours(count: int) -> list:
    cmap = colormaps["tab10" if count <= 10 else "tab20"]
    return [cmap(c % cmap.N) for c in range(count)]
