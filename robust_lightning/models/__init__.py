"""Reference models, written as plain LightningModules."""

from robust_lightning.models.small_cnn import SmallCNN

__all__ = ["SmallCNN"]
