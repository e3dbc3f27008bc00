"""Adversarial attacks for training and evaluation: torchattacks, run in the unit box of the data's range."""

from robust_lightning.attacks.bounds import InputBounds, UnitBoxModel
from robust_lightning.attacks.factory import ATTACKS, build_attack, perturb

__all__ = ["ATTACKS", "InputBounds", "UnitBoxModel", "build_attack", "perturb"]
