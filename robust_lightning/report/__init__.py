"""Reports of a run: tables for the terminal, metrics.csv; the run report with its figures is in :mod:`.run_report`."""

from robust_lightning.report.csv_logger import ResumableCSVLogger
from robust_lightning.report.table import format_table, per_class_table

__all__ = ["ResumableCSVLogger", "format_table", "per_class_table"]
