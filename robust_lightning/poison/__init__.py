"""Poisoning drills: controlled attacks with a ground-truth mask, to measure defences.

A rate ``r`` changes exactly ``round(r * n)`` eligible samples (halves round up), and every
changed label moves to a *different* class.
"""

from robust_lightning.poison.base import LabelPoison, PoisonResult
from robust_lightning.poison.pair_flip import PairFlip, pair_flip
from robust_lightning.poison.symmetric import SymmetricNoise, symmetric_noise

__all__ = ["LabelPoison", "PairFlip", "PoisonResult", "SymmetricNoise", "pair_flip", "symmetric_noise"]
