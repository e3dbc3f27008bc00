"""Batch-mixing augmentations as tensor functions: mixup and CutMix."""

from robust_lightning.augment.mix import cutmix, mixed_targets, mixup

__all__ = ["cutmix", "mixed_targets", "mixup"]
