"""PoisonFilter: find poisoned training samples while training runs, then exclude, report or down-weight them."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Callback, LightningDataModule, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_only
from lightning_utilities.core.overrides import is_overridden
from torch import Tensor

from robust_lightning.callbacks.criterion_swap import CriterionSwap, Reweight
from robust_lightning.callbacks.embedding import classifier_head
from robust_lightning.callbacks.restart import (
    announce_restart,
    head_state,
    load_training_state,
    reset_early_stopping,
    restart_kind,
    training_state,
)
from robust_lightning.callbacks.signals import SignalCollector
from robust_lightning.data.fields import Key
from robust_lightning.data.robust import RobustDataModule
from robust_lightning.detectors import (
    DETECTORS,
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
from robust_lightning.detectors.combine import RULES
from robust_lightning.report.flagged import write_flagged

log = logging.getLogger(__name__)

ACTIONS = ("exclude", "report", "weight")
RESTARTS = ("head", "model", None)
# Confirm with precision (a model that never trained on the excluded samples judges them), screen with recall.
# Both look for triggers in the inputs too: one triggered sample whose features pass is enough to
# bring a backdoor back (docs/pages/filtering.md, "On seeds it was not tuned on").
DEFAULT_DETECTORS = (SpectralSignatures(z=5.0), KNNLabelConsistency(k=10, agreement=0.2), InputSpectralSignatures())
# The screen judges labels out of sample (LinearProbe): the screen before it held out up to three times as many
# clean samples for the ten epochs after the restart (docs/pages/filtering.md, "What changed: the screen judges labels
# out of sample").
DEFAULT_SCREEN = (LinearProbe(ridge=10.0), SpectralSignatures(z=3.0), InputSpectralSignatures())


def build_detector(detector: str | Detector) -> tuple[str, Detector]:
    """A detector and its name, from a name of :data:`~robust_lightning.detectors.DETECTORS` or an instance."""
    if isinstance(detector, str):
        if detector not in DETECTORS:
            raise ValueError(f"Unknown detector {detector!r}. Choose from {sorted(DETECTORS)} or pass an instance.")
        return detector, DETECTORS[detector]()
    if not callable(detector):
        raise TypeError(f"A detector must be a name or a callable taking Signals, got {type(detector).__name__}.")
    return getattr(detector, "name", type(detector).__name__), detector


class PoisonFilter(Callback):
    """Detect poisoned training samples during training and exclude, report or down-weight them.

    **Signals.** While the model trains, the margin of every sample's given label is recorded
    from the logits of its training step (for :class:`~robust_lightning.detectors.AreaUnderMargin`).
    At each round one inference pass, under the trainer's precision, reads the features and logits
    of every training sample, excluded ones included, and of the datamodule's validation split
    (``val_dataloader()``, read by the filter itself, whether or not the module validates), which
    serves as the trusted reference (:class:`~robust_lightning.callbacks.signals.SignalCollector`).
    Features come from a forward hook on the input of the model's classifier head (see
    :func:`~robust_lightning.callbacks.embedding.head_input`: the pooled features of a CNN), or on
    the output of ``layer``; logits are the output of ``forward``. No extra training run. Every
    detector costs time and memory linear in the number of samples (docs/pages/scale.md).

    **Screen, restart, confirm.** Once the model has trained ``start_epoch`` epochs, the ``screen``
    detectors, tuned for recall, flag suspects. A model keeps what it learned from them (a
    memorised flip, a backdoor) even once they are excluded, so (unless ``action="report"``) the
    suspects are excluded and, when the next epoch starts (so that the checkpoints of this epoch
    still hold the model their scores belong to), the model restarts:

    - ``restart="head"`` (default): the classifier head (its trailing Linear layers, see
      :func:`~robust_lightning.callbacks.embedding.classifier_head`) goes back to its weights at
      the start of fit and the optimizer forgets its running state (Adam's moments); the feature
      layers, the learning rates, the schedules and the run's length go on. The head is where a trigger's label and memorised flips are kept: on
      the digits a head restart removes the backdoor as a full restart does, at no extra epochs
      (docs/pages/filtering.md). In a deep network a trigger can live in the features too: measure the
      attack success rate, or restart the whole model.
    - ``restart="model"``: the weights, optimizer and schedulers go back to their state at the
      start of fit, and the run is extended by the epochs spent (``max_steps`` by the steps), so
      that the restarted model trains ``max_epochs`` epochs without the suspects.
    - ``restart=None``: no restart; every round uses ``detectors``.

    Lightning's ``WeightAveraging`` averages afresh.
    ``EarlyStopping`` starts counting afresh (but one that stops the run in the restart epoch
    itself, e.g. by ``stopping_threshold`` on the old model, ends it before the restart); a
    ``ModelCheckpoint`` "best" score from before the restart is kept, so monitor a metric the
    restarted model will beat or use ``save_last``. The schedule counts again from the restart: a round runs after
    ``start_epoch`` epochs and every ``every_n_epochs`` after, with ``detectors``, tuned for
    precision, joined by ``rule``. On top of them, whatever the rule, a sample this filter
    excluded stays out while the restarted model, whose head has never trained on its label (a
    :class:`~robust_lightning.callbacks.PseudoLabels` beside it trains on its input), finds its
    label less likely than chance, ``p(label) < 1 / classes`` (exclusionary reclassification, the
    confirmation step of activation clustering): the screen's false alarms come back, poisoned
    samples stay out.

    **Action.** Each round replaces the previous flags. Flagged samples are excluded through
    :class:`~robust_lightning.data.RobustDataModule` from the next epoch on (``action="exclude"``;
    exclusions made by others are left alone), only logged (``"report"``), or have their loss
    multiplied by ``weight`` (``"weight"``, through the module's ``criterion``).

    **Logging.** ``filter/flagged`` and ``filter/flagged/{class}``, and with a drill's ground truth
    ``filter/precision``, ``filter/recall`` and ``filter/f1``. ``flagged.csv`` (id, label, score,
    detector) is written to ``dirpath`` (default: the logger's folder) after each round.

    **DDP.** Each rank reads its share of the training set; one sum over the ranks per signal
    makes the signals whole on every rank, and rank 0's decision is broadcast, so every rank
    excludes the same samples. The state (flags, margins, rounds, the initial weights until
    the restart, the extension) is kept in checkpoints; a new fit without ``ckpt_path`` starts afresh.

    Args:
        detectors: detector names (see :data:`~robust_lightning.detectors.DETECTORS`) or instances,
            for the rounds after the restart (or every round without one). The default:
            spectral signatures against the trusted split at 5 standard deviations (triggers,
            flips), kNN label consistency (scattered noise) and
            :class:`~robust_lightning.detectors.InputSpectralSignatures` (stamped triggers).
        rule: how the detectors' flags combine: "any", "majority" or "all".
        start_epoch: epochs the model trains before the first round (and again after a restart).
        every_n_epochs: epochs between rounds; 0 runs one round (and one more after a restart).
        action: "exclude", "report" or "weight".
        weight: loss weight of flagged samples with ``action="weight"``, in [0, 1).
        layer: name of the submodule whose output are the features (default: the classifier head's input).
        dirpath: where ``flagged.csv`` goes.
        input_key: where the input is in a batch (default: position 0 or a key such as ``"image"``).
        target_key: where the label is (default: position 1 or a key such as ``"label"``).
        restart: after the first round that flags samples, restart the classifier head ("head"), the whole
            model with an extended run ("model"), or nothing (None). Either restart also restarts the
            module's loss state, the callbacks' state that follows the model, and every optimizer's
            running state.
        screen: the detectors of the round that restarts the model. The default errs toward
            flagging: :class:`~robust_lightning.detectors.LinearProbe` (a label that a linear probe
            on the features, fitted without the sample, rejects), spectral signatures at 3 trusted
            standard deviations, and :class:`~robust_lightning.detectors.InputSpectralSignatures`.
            Detectors that read the inputs get them flattened, and reduced to 1,024 values by a
            seeded random projection when wider.
        attr: the module's loss attribute, which ``action="weight"`` reweights.

    Example:
        >>> from lightning.pytorch import Trainer
        >>> from robust_lightning import RobustDataModule
        >>> from robust_lightning.data import DigitsDataModule
        >>> from robust_lightning.models import SmallCNN
        >>> from robust_lightning.poison import PairFlip
        >>> data = RobustDataModule(DigitsDataModule(), poison=PairFlip({4: 8, 8: 4}, rate=0.4))
        >>> import tempfile
        >>> filter_ = PoisonFilter(start_epoch=2, every_n_epochs=0, dirpath=tempfile.mkdtemp())
        >>> trainer = Trainer(max_epochs=4, callbacks=[filter_], logger=False, enable_checkpointing=False,
        ...                   enable_progress_bar=False, enable_model_summary=False)
        >>> trainer.fit(SmallCNN(), datamodule=data)
        >>> [r["epoch"] for r in filter_.rounds], trainer.current_epoch  # screen, restart the head, confirm
        ([2, 4], 4)
        >>> len(data.excluded_ids) == int(filter_.flags.sum()) > 0
        True
    """

    def __init__(
        self,
        detectors: Sequence[str | Detector] = DEFAULT_DETECTORS,
        rule: str = "any",
        start_epoch: int = 10,
        every_n_epochs: int = 5,
        action: str = "exclude",
        weight: float = 0.1,
        layer: str | None = None,
        dirpath: str | Path | None = None,
        input_key: Key | None = None,
        target_key: Key | None = None,
        restart: str | None = "head",
        screen: Sequence[str | Detector] = DEFAULT_SCREEN,
        attr: str = "criterion",
    ) -> None:
        self.detectors = build_detectors(detectors, "detectors")
        self.screen = build_detectors(screen, "screen")
        if rule not in RULES:
            raise ValueError(f"rule must be one of {RULES}, got {rule!r}.")
        if action not in ACTIONS:
            raise ValueError(f"action must be one of {ACTIONS}, got {action!r}.")
        if isinstance(start_epoch, bool) or int(start_epoch) != start_epoch or start_epoch < 1:
            raise ValueError(
                f"start_epoch must be an integer >= 1 (detection runs after that epoch), got {start_epoch!r}."
            )
        if isinstance(every_n_epochs, bool) or int(every_n_epochs) != every_n_epochs or every_n_epochs < 0:
            raise ValueError(f"every_n_epochs must be an integer >= 0 (0: detect once), got {every_n_epochs!r}.")
        if not 0 <= weight < 1:
            raise ValueError(f"weight must lie in [0, 1): the loss weight of flagged samples, got {weight!r}.")
        self.rule, self.action, self.weight = rule, action, float(weight)
        self.start_epoch, self.every_n_epochs = int(start_epoch), int(every_n_epochs)
        self.layer, self.dirpath, self.attr = layer, dirpath, attr
        self.input_key, self.target_key = input_key, target_key
        if isinstance(restart, bool) or restart not in RESTARTS:
            raise ValueError(
                f"restart must be 'head', 'model' or None, got {restart!r}: 'head' restarts the classifier head, "
                "'model' the whole model with an extended run (what restart=True did), None nothing (restart=False)."
            )
        self.restart = restart
        self._signals = SignalCollector("PoisonFilter", layer, input_key, target_key)
        self._trainer_training = False
        self._swap: CriterionSwap | None = None
        self._reweight: Reweight | None = None
        self._data: RobustDataModule | None = None
        self._extension_applied = False
        self._reset()

    def _reset(self) -> None:
        """Forget every earlier fit: a new run starts from nothing unless it resumes from a checkpoint."""
        self.flags: Tensor | None = None
        self.scores: Tensor | None = None
        self.decision: Decision | None = None  # the last round's, with which detectors flagged each sample
        self.rounds: list[dict[str, Any]] = []
        self.extended_by = 0
        self._extended_steps = 0
        self._signals.margin_sum = self._signals.margin_count = None
        self._owned: Tensor | None = None  # the ids this filter excluded (others' exclusions are left alone)
        self._seen: Tensor | None = None  # ids trained on since the restart
        self._initial: dict[str, Any] | None = None
        self._restart_pending = False

    @property
    def state_key(self) -> str:
        return self._generate_state_key(
            detectors=list(self.detectors), screen=list(self.screen), action=self.action, layer=self.layer
        )

    # ------------------------------------------------------------------ setup
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        self._reset()  # a resumed run gets its state back after setup, from the checkpoint
        self._data = RobustDataModule.from_trainer(trainer, by="PoisonFilter")
        self._check_reference()
        self._signals.attach(pl_module, self._data)
        if self._restarts and self.restart == "head":
            _check_head(pl_module)
        if self.action == "weight":
            self._swap = CriterionSwap.of(pl_module, self.attr, by="PoisonFilter(action='weight')")
            self._reweight = Reweight(self._swap, self._batch_weights)

    @property
    def _has_reference(self) -> bool:
        """Whether the datamodule has a validation split: the filter reads it itself, whether or not the module validates."""
        return is_overridden("val_dataloader", self._data, LightningDataModule)

    def _check_reference(self) -> None:
        """Detectors that compare with the trusted split need one: say so now, not after start_epoch epochs."""
        needing = [n for n, d in {**self.screen, **self.detectors}.items() if getattr(d, "needs_reference", False)]
        if needing and not self._has_reference:
            raise ValueError(
                f"PoisonFilter's detectors {needing} compare training samples with the validation split, which the "
                "filter treats as trusted, but the datamodule has no val_dataloader. Give "
                "your datamodule a val_dataloader of data you trust, or pass screen=[...] and detectors=[...] that "
                "need no reference, e.g. PoisonFilter(screen=['spectral', 'knn'], detectors=['spectral', 'knn'])."
            )

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        n = self._data.num_train
        if self.flags is None:
            self.flags, self._owned, self._seen = (torch.zeros(n, dtype=torch.bool) for _ in range(3))
            self.scores = torch.zeros(n)
        self._signals.start_margins(n)
        if self._restarts and self._initial is None and not self.restarted:
            self._initial = (
                training_state(trainer, pl_module) if self.restart == "model" else head_state(trainer, pl_module)
            )
        if self._swap is not None:
            self._swap.add(self._reweight)
        self.on_train_start(trainer, pl_module)

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        self.teardown(trainer, pl_module, "fit")

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # Resumed after a restart: in on_fit_start, before Lightning checks the checkpoint's epoch
        # against max_epochs, or here for strategies that restore callbacks only after on_fit_start.
        if self.extended_by and not self._extension_applied:
            self._extend(trainer)

    def _extend(self, trainer: Trainer) -> None:
        """Give the restarted model back the epochs and optimizer steps spent before the restart."""
        loop = trainer.fit_loop
        if loop.max_epochs is not None and loop.max_epochs > 0:
            loop.max_epochs += self.extended_by
        if loop.epoch_loop.max_steps > 0:
            loop.epoch_loop.max_steps += self._extended_steps
        self._extension_applied = True

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self._extension_applied = False
        self._signals.detach()
        if self._swap is not None:
            self._swap.remove(self._reweight)

    # ---------------------------------------------------------------- signals
    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        self._signals.tap.start()
        self._trainer_training = True

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._signals.tap.stop()
        self._trainer_training = False
        ids = self._data.batch_ids
        if ids is not None:
            self._seen[ids] = True  # trained on, whether or not training_step went through forward
        self._signals.record_margins(batch, ids)

    def _batch_weights(self, target: Tensor) -> Tensor | None:
        ids = self._data.batch_ids
        if not self._trainer_training or ids is None or len(ids) != len(target):
            return None
        weights = torch.ones(len(ids))
        weights[self.flags[ids]] = self.weight
        return weights

    # --------------------------------------------------------------- detection
    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        strategy = trainer.strategy
        self._signals.end_epoch(trainer)
        self._seen = strategy.reduce(self._seen.float().to(strategy.root_device), reduce_op="sum").cpu() > 0
        epoch = trainer.current_epoch + 1
        if self._due(epoch - self._start_of_training()):
            self._detect(trainer, pl_module, epoch)

    def _start_of_training(self) -> int:
        """The epoch after which the model last started learning: 0, or the round that restarted it."""
        return max((r["epoch"] for r in self.rounds if r["restarted"]), default=0)

    def _due(self, trained: int) -> bool:
        """Whether a round runs once the model has trained ``trained`` epochs since it (re)started."""
        if trained == self.start_epoch:
            return True
        return (
            bool(self.every_n_epochs)
            and trained > self.start_epoch
            and (trained - self.start_epoch) % self.every_n_epochs == 0
        )

    def _detect(self, trainer: Trainer, pl_module: LightningModule, epoch: int) -> None:
        detectors = self._round_detectors
        signals = self._signals.collect(
            trainer, pl_module, any_needs(detectors.values(), "needs_inputs"), self._has_reference
        )
        # Their labels never trained the restarted head (the features saw them before the screen, and
        # PseudoLabels trains on their inputs), so the answer on them does not echo their labels.
        held_out = self._owned & ~self._seen if self.restarted and self.action == "exclude" else None
        decision = decide(signals, detectors, self.rule, held_out)
        # Every rank judged the same signals; rank 0's verdict is taken all the same, so no rounding can split them.
        decision = decision._replace(
            **{k: trainer.strategy.broadcast(getattr(decision, k), src=0) for k in ("flags", "scores", "fired")}
        )
        flags = decision.flags
        if bool(flags.all()):
            raise RuntimeError(
                "PoisonFilter flagged every training sample, which would leave nothing to train on. "
                "Check the detectors' settings, or start detection later (start_epoch) once the model has learned."
            )
        self.flags, self.scores, self.decision = flags.clone(), decision.scores, decision
        if self.action == "exclude":
            self._exclude(flags)
        if self._initial is not None and bool(flags.any()):
            self._plan_restart(trainer, epoch)
        self.rounds.append(self._summary(epoch, signals.labels))
        self._log(pl_module, self.rounds[-1])
        self._write_csv(trainer, signals.labels)

    def _exclude(self, flags: Tensor) -> None:
        """Exclude the flagged samples and bring back the ones this filter excluded that are no longer flagged."""
        comeback, new = self._owned & ~flags, flags & ~self._data.excluded
        self._data.include(comeback.nonzero().flatten())
        self._data.exclude(new.nonzero().flatten())
        self._owned = (self._owned & flags) | new

    def _plan_restart(self, trainer: Trainer, epoch: int) -> None:
        """Restart when the next epoch starts, so that this epoch's checkpoints hold the model its scores belong to."""
        self._restart_pending = True
        reset_early_stopping(trainer)  # one that judged this epoch before this callback must not end the run
        if self.restart == "head":
            rank_zero_only(log.info)(
                "PoisonFilter restarts the classifier head from its initial weights after epoch %d.", epoch
            )
            return
        self.extended_by, self._extended_steps = epoch, trainer.global_step
        self._extend(trainer)
        rank_zero_only(log.info)(
            "PoisonFilter restarts the model from its initial state after epoch %d; the run goes on for %d more "
            "epochs, so that it trains max_epochs epochs without the flagged samples.",
            epoch,
            trainer.fit_loop.max_epochs - epoch,
        )

    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not self._restart_pending:
            return
        load_training_state(trainer, pl_module, self._initial)
        self._initial, self._restart_pending = None, False
        self._seen = torch.zeros_like(self._seen)
        reset_early_stopping(trainer)  # its best score so far belongs to the old model
        announce_restart(trainer)

    @property
    def _round_detectors(self) -> dict[str, Detector]:
        """The screen until the restart, the confirming detectors after it (and every round without one)."""
        return self.screen if self._initial is not None else self.detectors

    # ---------------------------------------------------------------- reports
    @property
    def _restarts(self) -> bool:
        return self.restart is not None and self.action != "report"

    @property
    def restarted(self) -> bool:
        """Whether the model (or its head) has been restarted after a round."""
        return any(r["restarted"] for r in self.rounds)

    def _summary(self, epoch: int, labels: Tensor) -> dict[str, Any]:
        per_class = torch.bincount(labels[self.flags], minlength=self._data.num_classes).tolist()
        summary: dict[str, Any] = {"epoch": epoch, "flagged": int(self.flags.sum()), "restarted": self._restart_pending}
        summary["per_class"] = {str(cls): count for cls, count in enumerate(per_class)}
        if self._data.poison_mask is not None:
            summary.update(detection_quality(self.flags, self._data.poison_mask))
        return summary

    def _log(self, pl_module: LightningModule, summary: dict[str, Any]) -> None:
        values = {"filter/flagged": float(summary["flagged"])}
        values.update({f"filter/flagged/{name}": float(n) for name, n in summary["per_class"].items()})
        values.update({f"filter/{k}": float(summary[k]) for k in ("precision", "recall", "f1") if k in summary})
        pl_module.log_dict(values, sync_dist=False)
        rank_zero_only(log.info)(
            "PoisonFilter, epoch %d: flagged %d samples%s",
            summary["epoch"],
            summary["flagged"],
            "".join(f", {k} {summary[k]:.3f}" for k in ("precision", "recall", "f1") if k in summary),
        )

    def _write_csv(self, trainer: Trainer, labels: Tensor) -> None:
        folder = Path(self.dirpath or trainer.log_dir or trainer.default_root_dir)  # log_dir: a collective
        if trainer.is_global_zero:
            write_flagged(folder / "flagged.csv", self.decision, labels)

    # ------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        if self.flags is None:
            return {}
        return {
            "version": 2,
            "flags": self.flags.clone(),
            "scores": self.scores.clone(),
            "fired": None if self.decision is None else self.decision.fired.clone(),
            "fired_names": None if self.decision is None else self.decision.names,
            "rounds": list(self.rounds),
            "margin_sum": self._signals.margin_sum.clone(),
            "margin_count": self._signals.margin_count.clone(),
            "initial": self._initial,
            "extended_by": self.extended_by,
            "extended_steps": self._extended_steps,
            "owned": self._owned.clone(),
            "seen": self._seen.clone(),
            "restart_pending": self._restart_pending,
        }

    def _check_saved_restart(self) -> None:
        """A run saved before its restart resumes with the restart it planned, or says what to pass."""
        saved = None if self._initial is None else restart_kind(self._initial)
        if saved in (None, self.restart):
            return
        raise ValueError(
            f"This checkpoint was saved by PoisonFilter(restart={saved!r}) before its restart, and this PoisonFilter "
            f"has restart={self.restart!r}. Resume with PoisonFilter(restart={saved!r}) (checkpoints of earlier "
            "versions: 'model')."
        )

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if not state_dict:
            return
        self.flags, self.scores = state_dict["flags"].clone(), state_dict["scores"].clone()
        self.decision = _saved_decision(state_dict, self.flags, self.scores)
        self.rounds = list(state_dict["rounds"])
        self._signals.margin_sum = state_dict["margin_sum"].clone()
        self._signals.margin_count = state_dict["margin_count"].clone()
        self._initial = state_dict["initial"]
        self._check_saved_restart()
        self.extended_by, self._extended_steps = state_dict["extended_by"], state_dict["extended_steps"]
        self._owned, self._seen = state_dict["owned"].clone(), state_dict["seen"].clone()
        self._restart_pending = state_dict["restart_pending"]


def build_detectors(detectors: Sequence[str | Detector] | str | Detector, what: str) -> dict[str, Detector]:
    """Detectors by name, from names of :data:`~robust_lightning.detectors.DETECTORS` or instances; ``what`` names them in errors."""
    if isinstance(detectors, (str, bytes)) or callable(detectors):
        detectors = [detectors]
    built = dict(build_detector(d) for d in detectors)
    if not built:
        raise ValueError(f"PoisonFilter needs at least one detector in {what}.")
    return built


def _check_head(pl_module: LightningModule) -> None:
    try:
        classifier_head(pl_module)
    except ValueError:
        raise ValueError(
            f"PoisonFilter(restart='head') restarts the classifier head of {type(pl_module).__name__}, its trailing "
            "nn.Linear layers, and it has none. Pass restart='model' to restart the whole model instead."
        ) from None


def _saved_decision(state_dict: dict[str, Any], flags: Tensor, scores: Tensor) -> Decision | None:
    """The last round's decision from a checkpoint; version 1 saved the detectors' names per sample."""
    if state_dict.get("version", 1) >= 2:
        fired = state_dict["fired"]
        return None if fired is None else Decision(flags, scores, fired.clone(), tuple(state_dict["fired_names"]))
    sources = state_dict["sources"]
    names = tuple(sorted({name for source in sources for name in source.split("+") if name}))
    fired = torch.tensor([sum(1 << names.index(n) for n in source.split("+") if n) for source in sources])
    return Decision(flags, scores, fired, names)
