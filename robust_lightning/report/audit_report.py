"""The audit report: what the audit of a trained model flagged, per detector and per class, and the most suspicious samples."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lightning.pytorch import LightningModule
from torch import Tensor

from robust_lightning.data.robust import RobustDataModule
from robust_lightning.detectors import Decision, detection_quality
from robust_lightning.report import plots
from robust_lightning.report.run_report import Section, suspicious, write_sections


def write_audit_report(
    decision: Decision,
    labels: Tensor,
    datamodule: RobustDataModule,
    model: LightningModule,
    root: Path,
    title: str = "Audit report",
    input_key: Any = None,
    target_key: Any = None,
) -> Path:
    """Write ``report.md`` and ``report.html`` of an audit into ``root``; return the HTML's path."""
    folder = root / "report"
    folder.mkdir(parents=True, exist_ok=True)
    poisoned = datamodule.poison_mask
    histogram = plots.score_histogram(
        decision.scores.numpy(),
        None if poisoned is None else poisoned.numpy().astype(bool),
        decision.flags.numpy().astype(bool),
        folder / "audit_scores.png",
        title="Audit scores",
    )
    sections = [
        _summary(decision, labels, datamodule, model),
        Section("Scores", ["Each sample's mean rank over the detectors' scores."], figure=histogram),
        _per_class(decision, labels, poisoned),
        suspicious(decision.scores, datamodule, model, folder, input_key, target_key, decision),
    ]
    return write_sections(sections, root, title)


def _summary(decision: Decision, labels: Tensor, datamodule: RobustDataModule, model: LightningModule) -> Section:
    flags = decision.flags
    share = 100 * float(flags.float().mean())
    read = f"{type(model).__name__}, already trained, read the {len(labels)} training samples once"
    text = [f"{read}: {int(flags.sum())} flagged ({share:.1f}%). Nothing was trained."]
    if datamodule.poison_mask is not None:
        quality = detection_quality(flags, datamodule.poison_mask)
        text.append(
            f"Drill: {datamodule.poison!r}, {int(datamodule.poison_mask.sum())} samples poisoned. Against it: "
            f"precision {quality['precision']:.3f}, recall {quality['recall']:.3f}, F1 {quality['f1']:.3f}."
        )
    fired = decision.fired[flags]
    rows = [[name, int((fired >> j & 1).sum())] for j, name in enumerate(decision.names)]
    return Section("Summary", text, (["detector", "flagged samples it fired on"], rows))


def _per_class(decision: Decision, labels: Tensor, poisoned: Tensor | None) -> Section:
    header = ["given label", "samples", "flagged", "flagged %"] + (
        ["poisoned by the drill"] if poisoned is not None else []
    )
    rows = []
    for label in labels.unique().tolist():
        members = labels == label
        flagged = int(decision.flags[members].sum())
        row = [label, int(members.sum()), flagged, f"{100 * flagged / int(members.sum()):.1f}"]
        rows.append(row + ([int(poisoned[members].sum())] if poisoned is not None else []))
    return Section("Per class", ["Flags by the label each sample was given."], (header, rows))
