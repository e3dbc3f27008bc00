"""Poisoned-sample detectors: pure tensor code, from per-sample signals to scores and flags.

Each detector is a class taking :class:`Signals` and returning a :class:`Detection`, with a
functional twin on plain tensors. :data:`DETECTORS` maps the names used in configs to classes.
"""

from robust_lightning.detectors.base import Detection, Detector, Signals, detection_quality, margins_of
from robust_lightning.detectors.clustering import ActivationClustering, activation_clustering, two_means
from robust_lightning.detectors.combine import Decision, Ensemble, combine, decide
from robust_lightning.detectors.duplicates import NearDuplicates, near_duplicates
from robust_lightning.detectors.dynamics import AreaUnderMargin, area_under_margin, exclusionary_reclassification
from robust_lightning.detectors.knn import KNNLabelConsistency, ReferenceKNN, knn_label_consistency, reference_knn
from robust_lightning.detectors.probe import LinearProbe, linear_probe
from robust_lightning.detectors.spectral import (
    InputSpectralSignatures,
    SpectralSignatures,
    reference_spectral_signatures,
    spectral_signatures,
)

DETECTORS = {
    cls.name: cls
    for cls in (
        SpectralSignatures,
        InputSpectralSignatures,
        ActivationClustering,
        KNNLabelConsistency,
        ReferenceKNN,
        LinearProbe,
        AreaUnderMargin,
        NearDuplicates,
    )
}

__all__ = [
    "DETECTORS",
    "ActivationClustering",
    "AreaUnderMargin",
    "Decision",
    "Detection",
    "Detector",
    "Ensemble",
    "InputSpectralSignatures",
    "KNNLabelConsistency",
    "LinearProbe",
    "NearDuplicates",
    "ReferenceKNN",
    "Signals",
    "SpectralSignatures",
    "activation_clustering",
    "area_under_margin",
    "combine",
    "decide",
    "detection_quality",
    "exclusionary_reclassification",
    "knn_label_consistency",
    "linear_probe",
    "margins_of",
    "near_duplicates",
    "reference_knn",
    "reference_spectral_signatures",
    "spectral_signatures",
    "two_means",
]
