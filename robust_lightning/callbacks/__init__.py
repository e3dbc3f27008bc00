"""Lightning callbacks that add robustness to an unmodified LightningModule."""

from robust_lightning.callbacks.adversarial_training import AdversarialTraining
from robust_lightning.callbacks.class_balance import ClassBalance
from robust_lightning.callbacks.cutmix import CutMix
from robust_lightning.callbacks.drift_monitor import DriftMonitor
from robust_lightning.callbacks.ema_weights import EMAWeights
from robust_lightning.callbacks.epoch_lines import EpochLines
from robust_lightning.callbacks.mixup import Mixup
from robust_lightning.callbacks.per_class_metrics import PerClassMetrics
from robust_lightning.callbacks.poison_filter import PoisonFilter
from robust_lightning.callbacks.pseudo_labels import PseudoLabels
from robust_lightning.callbacks.robust_evaluation import RobustEvaluation
from robust_lightning.callbacks.robust_loss import RobustLoss
from robust_lightning.callbacks.run_report import RunReport

__all__ = [
    "AdversarialTraining",
    "ClassBalance",
    "CutMix",
    "DriftMonitor",
    "EMAWeights",
    "EpochLines",
    "Mixup",
    "PerClassMetrics",
    "PoisonFilter",
    "PseudoLabels",
    "RobustEvaluation",
    "RobustLoss",
    "RunReport",
]
