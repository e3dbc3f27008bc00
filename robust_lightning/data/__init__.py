"""Data: the RobustDataModule wrapper, its validation, and the bundled digits."""

from robust_lightning.data.digits import DigitsDataModule
from robust_lightning.data.robust import RobustDataModule
from robust_lightning.data.validation import DataSummary, DataValidationError, scan_split

__all__ = ["DataSummary", "DataValidationError", "DigitsDataModule", "RobustDataModule", "scan_split"]
