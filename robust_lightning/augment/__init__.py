"""Augmentations as tensor functions: mixup and CutMix, and the per-sample shift of pseudo-label training."""

from robust_lightning.augment.mix import cutmix, mixed_targets, mixup
from robust_lightning.augment.shift import random_shift

__all__ = ["cutmix", "mixed_targets", "mixup", "random_shift"]
