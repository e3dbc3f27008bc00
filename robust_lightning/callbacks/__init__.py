"""Lightning callbacks that add robustness to an unmodified LightningModule."""

from robust_lightning.callbacks.per_class_metrics import PerClassMetrics

__all__ = ["PerClassMetrics"]
