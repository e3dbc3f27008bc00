"""Reports of a run: tables for the terminal; the run report with its figures is in :mod:`.run_report`."""

from robust_lightning.report.table import format_table, per_class_table

__all__ = ["format_table", "per_class_table"]
