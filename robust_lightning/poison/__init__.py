"""Poisoning drills: controlled attacks with a ground-truth mask, to measure defences.

A rate ``r`` changes exactly ``round(r * n)`` eligible samples (halves round up), and every
changed label moves to a *different* class.
"""

from robust_lightning.poison.backdoor import BackdoorTrigger, stamp_trigger
from robust_lightning.poison.base import Injection, InjectionPoison, InputPoison, LabelPoison, PoisonResult
from robust_lightning.poison.class_injection import ClassInjection
from robust_lightning.poison.feature_collision import FeatureCollision, feature_collision
from robust_lightning.poison.feature_shift import FeatureShift, feature_shift
from robust_lightning.poison.label_consistent_backdoor import LabelConsistentBackdoor, hard_to_learn
from robust_lightning.poison.pair_flip import PairFlip, pair_flip
from robust_lightning.poison.symmetric import SymmetricNoise, symmetric_noise

__all__ = [
    "BackdoorTrigger",
    "ClassInjection",
    "FeatureCollision",
    "FeatureShift",
    "Injection",
    "InjectionPoison",
    "InputPoison",
    "LabelConsistentBackdoor",
    "LabelPoison",
    "PairFlip",
    "PoisonResult",
    "SymmetricNoise",
    "feature_collision",
    "feature_shift",
    "hard_to_learn",
    "pair_flip",
    "stamp_trigger",
    "symmetric_noise",
]
