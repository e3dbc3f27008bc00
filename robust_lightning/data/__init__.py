"""Data: the RobustDataModule wrapper, its validation, the bundled digits, and MNIST/CIFAR-10 for download."""

from robust_lightning.data.digits import DigitsDataModule
from robust_lightning.data.robust import RobustDataModule
from robust_lightning.data.validation import DataSummary, DataValidationError, scan_split
from robust_lightning.data.vision import VisionDataModule

__all__ = [
    "DataSummary",
    "DataValidationError",
    "DigitsDataModule",
    "RobustDataModule",
    "VisionDataModule",
    "scan_split",
]
