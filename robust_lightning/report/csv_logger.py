"""ResumableCSVLogger: metrics.csv that a resumed run continues instead of breaking."""

from __future__ import annotations

import csv

from lightning.fabric.loggers.logger import rank_zero_experiment
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter


class ResumableCSVLogger(CSVLogger):
    """Lightning's :class:`~lightning.pytorch.loggers.CSVLogger`, continued by a run that resumes in the same folder.

    Lightning's writer deletes an existing ``metrics.csv``, and in a file it keeps would start
    knowing no columns, then fail on the earlier rows' others. This one keeps the file's columns and
    its rows from before the resumed run's first step, and drops those
    from that step on: the stopped run logged them after its last checkpoint, and the resumed run
    logs them again. A run in a fresh folder writes the same file as CSVLogger.

    Example:
        >>> import tempfile
        >>> folder = tempfile.mkdtemp()
        >>> first = ResumableCSVLogger(folder, name="", version="")
        >>> first.log_metrics({"loss": 1.0}, step=0); first.log_metrics({"acc": 0.5}, step=1); first.save()
        >>> resumed = ResumableCSVLogger(folder, name="", version="")  # stopped after step 0
        >>> resumed.log_metrics({"loss": 0.9}, step=1); resumed.save()
        >>> open(f"{folder}/metrics.csv").read().splitlines()
        ['acc,loss,step', ',1.0,0', ',0.9,1']
    """

    @property
    @rank_zero_experiment
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _ContinuingWriter(log_dir=self.log_dir)
        return self._experiment


class _ContinuingWriter(ExperimentWriter):
    def __init__(self, log_dir: str) -> None:
        super().__init__(log_dir)
        self._continued = False

    def _check_log_dir_exists(self) -> None:
        """Keep metrics.csv: the first save decides which of its rows stay."""

    def save(self) -> None:
        if self.metrics and not self._continued:
            self._keep_rows_before(min(row["step"] for row in self.metrics))
            self._continued = True
        super().save()

    def _keep_rows_before(self, step: int) -> None:
        if not self._fs.isfile(self.metrics_file_path):
            return
        with self._fs.open(self.metrics_file_path, "r", newline="") as file:
            reader = csv.DictReader(file)
            rows = [row for row in reader if int(float(row["step"])) < step]
            self.metrics_keys = list(reader.fieldnames or [])
        with self._fs.open(self.metrics_file_path, "w", newline="") as file:
            writer = csv.DictWriter(file, fieldnames=self.metrics_keys)
            writer.writeheader()
            writer.writerows(rows)
