"""Spectral signatures: poisoned samples stand out along the top singular direction of their class."""

from __future__ import annotations

import torch
from torch import Tensor

from robust_lightning.detectors.base import (
    Detection,
    Signals,
    by_class,
    check_positive,
    class_means,
    principal_directions,
    project,
)

# Below this many trusted samples a class's spread is too noisy to set a threshold from.
MIN_REFERENCE = 3


def spectral_signatures(features: Tensor, labels: Tensor, num_classes: int, expected_fraction: float = 0.1):
    """Tran et al. (2018), as published: per class, flag the ``1.5 * expected_fraction`` of samples
    with the largest squared projection on the top singular vector of the centred features.

    >>> x = torch.cat([torch.randn(90, 4, generator=torch.Generator().manual_seed(0)), torch.full((10, 4), 6.0)])
    >>> spectral_signatures(x, torch.zeros(100, dtype=torch.long), 1, 0.1).flags[90:].all().item()
    True
    """
    check_positive("expected_fraction", expected_fraction)
    scores = torch.zeros(len(labels))
    flags = torch.zeros(len(labels), dtype=torch.bool)
    for ids, mean in class_means(features, labels, num_classes, min_size=2):
        direction = principal_directions(features, centre=mean, ids=ids)
        scores[ids] = project(features, ids, mean, direction)[:, 0].pow(2).cpu()
        count = min(len(ids), round(1.5 * expected_fraction * len(ids)))
        flags[ids[scores[ids].topk(count).indices]] = True
    return Detection(scores, flags)


def reference_spectral_signatures(
    features: Tensor,
    labels: Tensor,
    reference: Tensor,
    reference_labels: Tensor,
    num_classes: int,
    z: float = 3.0,
    directions: int = 1,
) -> Detection:
    """Spectral signatures measured against trusted samples, so no poison fraction is assumed.

    Each class's training features are centred on the *trusted* class mean. Poisoned samples
    (mislabelled, or carrying a trigger) pull the top singular direction toward themselves; a
    sample is flagged when its projection lies more than ``z`` trusted standard deviations from
    the trusted samples' own. Classes with fewer than 3 trusted samples are not judged.

    >>> g = torch.Generator().manual_seed(0)
    >>> clean, odd = torch.randn(90, 4, generator=g), torch.randn(10, 4, generator=g) + 6
    >>> ref = torch.randn(20, 4, generator=g)
    >>> labels, ref_labels = torch.zeros(100, dtype=torch.long), torch.zeros(20, dtype=torch.long)
    >>> d = reference_spectral_signatures(torch.cat([clean, odd]), labels, ref, ref_labels, 1)
    >>> int(d.flags[90:].sum()), int(d.flags[:90].sum())
    (10, 0)
    """
    check_positive("z", z)
    scores = torch.zeros(len(labels))
    trusted = by_class(reference_labels, num_classes)
    for cls, ids in enumerate(by_class(labels, num_classes)):
        if len(ids) == 0 or len(trusted[cls]) < MIN_REFERENCE:
            continue
        anchor = reference[trusted[cls]].float()
        centre = anchor.mean(0)
        basis = principal_directions(features, directions, centre, ids)
        own = (anchor - centre) @ basis.T
        spread = own.std(0).clamp_min(1e-6 * float(own.abs().max().clamp_min(1.0)))
        scores[ids] = ((project(features, ids, centre, basis) - own.mean(0)).abs() / spread).amax(1).cpu()
    return Detection(scores, scores > z)


class SpectralSignatures:
    """Spectral signatures (Tran, Li & Madry, NeurIPS 2018) on penultimate features.

    With trusted reference samples in the signals (the validation split), the default, each
    class is centred on its trusted mean and samples beyond ``z`` trusted standard deviations
    along the top singular direction are flagged (:func:`reference_spectral_signatures`): the
    number flagged follows the data, and clean data loses almost nothing. Without a reference it
    falls back to the paper's rule of flagging ``1.5 * expected_fraction`` per class.

    Args:
        z: threshold in trusted standard deviations (reference mode). Default 3.
        expected_fraction: the assumed poison fraction (paper mode). Default 0.1.

    Example:
        >>> from robust_lightning.detectors import Signals
        >>> x = torch.cat([torch.randn(90, 4, generator=torch.Generator().manual_seed(0)), torch.full((10, 4), 6.0)])
        >>> detection = SpectralSignatures()(Signals(torch.zeros(100, dtype=torch.long), 1, features=x))
        >>> int(detection.flags.sum())
        15
    """

    name = "spectral"

    def __init__(self, z: float = 3.0, expected_fraction: float = 0.1, directions: int = 1) -> None:
        self.z = check_positive("z", z)
        self.directions = int(check_positive("directions", directions))
        self.expected_fraction = check_positive("expected_fraction", expected_fraction)

    def __call__(self, signals: Signals) -> Detection:
        signals.need("features", by="SpectralSignatures")
        if signals.reference_features is None:
            return spectral_signatures(signals.features, signals.labels, signals.num_classes, self.expected_fraction)
        return reference_spectral_signatures(
            signals.features,
            signals.labels,
            signals.reference_features,
            signals.reference_labels,
            signals.num_classes,
            self.z,
            self.directions,
        )


class InputSpectralSignatures:
    """Spectral signatures against the trusted split, on the inputs instead of the features.

    A patch trigger is one fixed pixel pattern, which the inputs show whatever the model's
    features have learned: a triggered sample whose features look like its target class (its
    digit resembles the target, say) still stands out in input space. Each class's training
    inputs are centred on the trusted mean of that class and projected on their top singular
    direction, as in :func:`reference_spectral_signatures` (Tran, Li & Madry, NeurIPS 2018,
    applied to the raw inputs). :class:`~robust_lightning.callbacks.PoisonFilter` reduces inputs
    wider than 1,024 values by a seeded random projection first.

    The default ``z=8`` is far out on purpose. On the bundled digits, at 12 seeds:

    - every BadNets-triggered sample scores at least 8.8 trusted standard deviations;
    - no clean sample scores above 8, with or without poisoning;
    - flipped labels score lower, and are left to the feature detectors.

    A trigger blended into the whole image, or one placed where the class's own inputs already
    vary, scores lower. So do training augmentations: the filter reads the training inputs as
    training sees them, and a random crop or flip moves the patch and widens the class's spread.
    Measure on your data.

    Args:
        z: threshold in trusted standard deviations. Default 8.

    Example:
        >>> from robust_lightning.detectors import Signals
        >>> g = torch.Generator().manual_seed(0)
        >>> inputs = torch.rand(100, 16, generator=g)
        >>> inputs[90:, -2:] = 6.0  # a stamped corner
        >>> signals = Signals(torch.zeros(100, dtype=torch.long), 1, inputs=inputs,
        ...                   reference_inputs=torch.rand(20, 16, generator=g), reference_labels=torch.zeros(20, dtype=torch.long))
        >>> InputSpectralSignatures()(signals).flags.nonzero().flatten().tolist()
        [90, 91, 92, 93, 94, 95, 96, 97, 98, 99]
    """

    name = "input_spectral"
    needs_reference = True
    needs_inputs = True

    def __init__(self, z: float = 8.0) -> None:
        self.z = check_positive("z", z)

    def __call__(self, signals: Signals) -> Detection:
        signals.need("inputs", "reference_inputs", "reference_labels", by="InputSpectralSignatures")
        return reference_spectral_signatures(
            signals.inputs,
            signals.labels,
            signals.reference_inputs,
            signals.reference_labels,
            signals.num_classes,
            self.z,
        )
