"""flagged.csv: the samples a detection round flagged, with their label, score and the detectors that fired."""

from __future__ import annotations

import csv
from pathlib import Path

from torch import Tensor

from robust_lightning.detectors import Decision


def write_flagged(path: str | Path, decision: Decision, labels: Tensor) -> Path:
    """Write one row per flagged sample: ``id, label, score, detector`` (detectors joined by "+").

    Example:
        >>> import tempfile, torch
        >>> decision = Decision(torch.tensor([False, True]), torch.tensor([0.1, 0.9]), torch.tensor([0, 1]), ("knn",))
        >>> path = write_flagged(Path(tempfile.mkdtemp()) / "flagged.csv", decision, torch.tensor([3, 5]))
        >>> path.read_text().splitlines()
        ['id,label,score,detector', '1,5,0.9,knn']
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    ids = decision.flags.nonzero().flatten()
    rows = zip(ids.tolist(), labels[ids].tolist(), decision.scores[ids].tolist(), decision.sources(ids))
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["id", "label", "score", "detector"])
        writer.writerows((i, label, f"{score:.6g}", source) for i, label, score, source in rows)
    return path
