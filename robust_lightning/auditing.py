"""Audit a model that is already trained: flag suspicious training samples with the filter's detectors, no training."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

from lightning.pytorch import Callback, LightningDataModule, LightningModule, Trainer
from lightning_utilities.core.overrides import is_overridden
from torch import Tensor

from robust_lightning.callbacks.poison_filter import build_detectors
from robust_lightning.callbacks.signals import SignalCollector
from robust_lightning.data.fields import Key
from robust_lightning.data.robust import RobustDataModule
from robust_lightning.detectors import (
    Decision,
    Detector,
    InputSpectralSignatures,
    KNNLabelConsistency,
    LinearProbe,
    SpectralSignatures,
    decide,
    detection_quality,
)
from robust_lightning.detectors.base import any_needs
from robust_lightning.report.audit_report import write_audit_report
from robust_lightning.report.flagged import write_flagged

# A trained model has memorised its labels, so each detector judges out of sample or against the trusted split:
# the probe leave-one-out, the kNN vote among the others, the spectral detectors against trusted samples.
AUDIT_DETECTORS = (
    LinearProbe(ridge=10.0),
    KNNLabelConsistency(k=10, agreement=0.2),
    SpectralSignatures(z=5.0),
    InputSpectralSignatures(),
)


class Audit(NamedTuple):
    """The audit of every training sample, in id order: its given label and the decision on it."""

    labels: Tensor
    decision: Decision
    quality: dict[str, float] | None  # precision, recall and F1 against a drill's ground truth, when there is one

    @property
    def flags(self) -> Tensor:
        return self.decision.flags


def audit(
    model: LightningModule,
    datamodule: LightningDataModule,
    detectors: Sequence[str | Detector] = AUDIT_DETECTORS,
    rule: str = "any",
    dirpath: str | Path | None = None,
    layer: str | None = None,
    input_key: Key | None = None,
    target_key: Key | None = None,
    accelerator: str = "auto",
    title: str = "Audit report",
) -> Audit:
    """Flag the training samples of ``datamodule`` that ``model``, already trained, gives away as poisoned.

    One inference pass over the training set and the validation split (trusted, as in
    :class:`~robust_lightning.callbacks.PoisonFilter`), then the detectors, joined by ``rule``: no
    training, where confident learning needs out-of-sample probabilities from K extra trainings.
    The model's weights and mode are left as they were. With ``dirpath``, ``flagged.csv`` (id,
    label, score, detector) and the report (``report.html``: flags per detector and per class, the
    score histogram and the most suspicious samples) are written there.

    Args:
        model: the trained module; its ``forward(x)`` returns logits.
        datamodule: the data it was trained on, plain or wrapped in
            :class:`~robust_lightning.RobustDataModule` (with a drill, the audit is scored against it).
        detectors: names of :data:`~robust_lightning.detectors.DETECTORS` or instances.
        rule: "any", "majority" or "all".
        dirpath: where ``flagged.csv`` and the report go; nothing is written without it.
        layer: the submodule whose input is the feature vector, as for PoisonFilter.
        input_key: where the inputs are in a batch, as for PoisonFilter.
        target_key: where the labels are in a batch, as for PoisonFilter.
        accelerator: where the pass runs, as for a Trainer.
        title: the report's heading.

    Example:
        >>> from lightning.pytorch import Trainer
        >>> from robust_lightning import RobustDataModule, audit
        >>> from robust_lightning.data import DigitsDataModule
        >>> from robust_lightning.models import SmallCNN
        >>> from robust_lightning.poison import PairFlip
        >>> data = RobustDataModule(DigitsDataModule(), poison=PairFlip({4: 8, 8: 4}, rate=0.4))
        >>> model = SmallCNN()
        >>> Trainer(max_epochs=5, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        ...         enable_model_summary=False).fit(model, datamodule=data)
        >>> found = audit(model, data, accelerator="cpu")
        >>> len(found.labels), found.quality["recall"] > 0.5
        (1293, True)
    """
    data = datamodule if isinstance(datamodule, RobustDataModule) else RobustDataModule(datamodule, validate=False)
    auditor = _Auditor(
        build_detectors(detectors, "detectors"), rule, SignalCollector("audit", layer, input_key, target_key)
    )
    was_training = model.training
    trainer = Trainer(
        accelerator=accelerator,
        devices=1,
        max_steps=0,  # no step: the fit only attaches the model, the data and the precision for the pass
        num_sanity_val_steps=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[auditor],
    )
    trainer.fit(model, datamodule=data)
    model.train(was_training)
    labels, decision = auditor.result
    if dirpath is not None:
        write_flagged(Path(dirpath) / "flagged.csv", decision, labels)
        write_audit_report(decision, labels, data, model, Path(dirpath), title, input_key, target_key)
    quality = None if data.poison_mask is None else detection_quality(decision.flags, data.poison_mask)
    return Audit(labels, decision, quality)


class _Auditor(Callback):
    """Reads the signals and decides when the fit starts, before any step."""

    def __init__(self, detectors: dict[str, Detector], rule: str, collector: SignalCollector) -> None:
        self.detectors, self.rule, self.collector = detectors, rule, collector
        self.result: tuple[Tensor, Decision] | None = None

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        data = RobustDataModule.from_trainer(trainer, by="audit")
        has_reference = is_overridden("val_dataloader", data, LightningDataModule)
        self.collector.attach(pl_module, data)
        try:
            signals = self.collector.collect(
                trainer, pl_module, any_needs(self.detectors.values(), "needs_inputs"), has_reference
            )
        finally:
            self.collector.detach()
        self.result = signals.labels, decide(signals, self.detectors, self.rule)
