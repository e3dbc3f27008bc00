"""Label-noise-robust classification losses: ``nn.Module``s on logits and class indices, one per file.

Each has a functional twin and takes ``weight`` (per class) and ``reduction`` like torch's own
losses. :data:`LOSSES` maps the names used in configs and by
:class:`~robust_lightning.callbacks.RobustLoss` to classes.
"""

from torch import nn

from robust_lightning.losses.base import RobustLossBase, apply_loss
from robust_lightning.losses.bootstrap import HardBootstrapLoss, SoftBootstrapLoss, bootstrap_loss
from robust_lightning.losses.elr import ELRLoss, early_learning_regularization
from robust_lightning.losses.forward_correction import (
    ForwardCorrectionLoss,
    estimate_transition,
    forward_correction,
)
from robust_lightning.losses.gce import GCELoss, generalized_cross_entropy
from robust_lightning.losses.nce_rce import NCERCELoss, nce_rce
from robust_lightning.losses.sample_state import PerSampleLoss, SampleSource
from robust_lightning.losses.sce import SCELoss, symmetric_cross_entropy
from robust_lightning.losses.taylor import TaylorCELoss, taylor_cross_entropy

LOSSES: dict[str, type[nn.Module]] = {
    "ce": nn.CrossEntropyLoss,
    "gce": GCELoss,
    "sce": SCELoss,
    "nce_rce": NCERCELoss,
    "bootstrap_soft": SoftBootstrapLoss,
    "bootstrap_hard": HardBootstrapLoss,
    "taylor": TaylorCELoss,
    "elr": ELRLoss,
    "forward": ForwardCorrectionLoss,
}

__all__ = [
    "LOSSES",
    "ELRLoss",
    "ForwardCorrectionLoss",
    "GCELoss",
    "HardBootstrapLoss",
    "NCERCELoss",
    "PerSampleLoss",
    "RobustLossBase",
    "SCELoss",
    "SampleSource",
    "SoftBootstrapLoss",
    "TaylorCELoss",
    "apply_loss",
    "bootstrap_loss",
    "early_learning_regularization",
    "estimate_transition",
    "forward_correction",
    "generalized_cross_entropy",
    "nce_rce",
    "symmetric_cross_entropy",
    "taylor_cross_entropy",
]
