"""Reports of a run: tables for the terminal."""

from robust_lightning.report.table import format_table, per_class_table

__all__ = ["format_table", "per_class_table"]
