"""DriftMonitor: test whether evaluation data still looks like the training data, on embeddings and predictions."""

from __future__ import annotations

import numbers
import warnings
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor

from robust_lightning.callbacks.embedding import FeatureTap
from robust_lightning.data.fields import Key
from robust_lightning.data.loader import IdBatch, as_loader_list
from robust_lightning.data.robust import RobustDataModule
from robust_lightning.data.validation import split_loader
from robust_lightning.metrics.drift import DriftReport, drift_tests, random_projection

# Every rank computes the values from the same gathered data, so logging them unsynced is right.
warnings.filterwarnings("ignore", message=r"It is recommended to use `self.log\('drift/")


def _positive_int(name: str, value: Any) -> int:
    if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}.")
    return int(value)


class DriftMonitor(Callback):
    """Flag evaluation data that no longer looks like the training data.

    At the end of every ``every_n_epochs``-th validation, and of every test run, the callback
    embeds a reference sample (``reference_size`` training samples drawn at random once, with
    ``seed``; or the ``reference`` loader) and the current data with the model as it is then, and
    runs five two-sample tests (:func:`~robust_lightning.metrics.drift_tests`):

    * KS per input feature, Bonferroni-corrected: noise or a stamped patch that the model has
      learnt to ignore still shows here;
    * KS per dimension of a random projection of the penultimate embeddings to ``projections``
      dimensions, Bonferroni-corrected;
    * MMD with a Gaussian kernel and a ``permutations``-fold permutation test, on embeddings;
    * chi-square on the label distribution, and on the predicted-class distribution.

    Current data is the validation set (``"val"``), each loader of ``dataloaders`` by its name,
    and the test set (``"test"``) during ``trainer.test``; at most ``current_size`` samples of each.
    It logs ``drift/{name}/{test}`` (the statistic), ``drift/{name}/{test}_p``, the overall
    ``drift/{name}/p`` (the smallest p-value times the number of tests, Bonferroni) and
    ``drift/{name}/flag`` (1 when that is below ``alpha``), warns on rank zero when it flags,
    and appends every result to :attr:`history`, which is saved in checkpoints. Under DDP every
    rank reaches the same result: the current data is gathered and the random draws are seeded.

    Embedding the training sample with the current model, rather than keeping the embeddings it
    had when it was trained on, compares like with like: drift is in the data, not in the model.
    Training samples come through the training dataset, so with heavy augmentation pass a
    ``reference`` loader of unaugmented training data. They are the training data as given,
    drawn before any filtering: samples a drill poisoned or PoisonFilter later excludes can be
    among them. When a trusted set exists, pass it as ``reference`` to test against it instead.

    Args:
        reference_size: training samples in the reference sample.
        current_size: samples of each current dataset tested (a seeded random subset if larger).
        projections: dimensions of the random projection for the KS tests.
        permutations: permutations of the MMD test (its smallest p-value is 1 / (1 + permutations)).
        alpha: the family-wise significance level over the five tests.
        dataloaders: more current datasets by name, e.g. ``{"triggered": DataLoader(...)}``.
        reference: a loader of reference data, in place of the random training sample.
        every_n_epochs: how often, in validation epochs, to test.
        layer: name of the submodule whose output is the embedding; by default the input of the
            classifier head, as in :class:`~robust_lightning.callbacks.PoisonFilter`.
        input_key: where the inputs are in a batch.
        target_key: where the labels are in a batch.
        seed: seeds the reference sample, the projection, the subsets and the permutations.

    Example:
        >>> from lightning.pytorch import Trainer
        >>> from robust_lightning.data import DigitsDataModule
        >>> from robust_lightning.models import SmallCNN
        >>> monitor = DriftMonitor(permutations=200)
        >>> trainer = Trainer(max_epochs=1, callbacks=[monitor], logger=False, enable_checkpointing=False,
        ...                   enable_progress_bar=False, enable_model_summary=False)
        >>> trainer.fit(SmallCNN(), datamodule=DigitsDataModule())
        >>> record = monitor.history[-1]
        >>> record["name"], sorted(record["tests"]), "drift/val/embedding_mmd_p" in trainer.callback_metrics
        ('val', ['embedding_ks', 'embedding_mmd', 'inputs', 'labels', 'predictions'], True)
    """

    def __init__(
        self,
        reference_size: int = 500,
        current_size: int = 500,
        projections: int = 16,
        permutations: int = 1000,
        alpha: float = 0.01,
        dataloaders: Mapping[str, Iterable[Any]] | None = None,
        reference: Iterable[Any] | None = None,
        every_n_epochs: int = 1,
        layer: str | None = None,
        input_key: Key | None = None,
        target_key: Key | None = None,
        seed: int = 0,
    ) -> None:
        self.reference_size = _positive_int("reference_size", reference_size)
        self.current_size = _positive_int("current_size", current_size)
        self.projections = _positive_int("projections", projections)
        self.permutations = _positive_int("permutations", permutations)
        self.every_n_epochs = _positive_int("every_n_epochs", every_n_epochs)
        if not isinstance(alpha, numbers.Real) or not 0 < alpha < 1:
            raise ValueError(f"alpha must lie in (0, 1), got {alpha!r}.")
        dataloaders = dict(dataloaders or {})
        for reserved in ("val", "test"):
            if reserved in dataloaders:
                raise ValueError(
                    f"{reserved!r} names the trainer's own {reserved} data; give your loader another name."
                )
        self.alpha, self.dataloaders, self.reference = float(alpha), dataloaders, reference
        self.layer, self.input_key, self.target_key, self.seed = layer, input_key, target_key, int(seed)
        self.history: list[dict[str, Any]] = []
        self._tap = FeatureTap("DriftMonitor", layer)
        self._reference_batches_drawn: list[Any] | None = None

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage == "fit":
            self._reference_batches_drawn = None  # the training data of this fit

    @property
    def state_key(self) -> str:
        return self._generate_state_key(layer=self.layer, seed=self.seed, names=sorted(self.dataloaders))

    # ------------------------------------------------------------------ hooks
    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # Drawn now, while the training data is at hand: testing after fit compares with it too.
        if self.reference is None and self._reference_batches_drawn is None:
            self._reference_batches_drawn = self._draw(trainer.train_dataloader)

    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.sanity_checking or (trainer.current_epoch + 1) % self.every_n_epochs:
            return
        current = {"val": as_loader_list(trainer.val_dataloaders), **{k: [v] for k, v in self.dataloaders.items()}}
        self._check(trainer, pl_module, {name: loaders for name, loaders in current.items() if loaders})

    def on_test_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._check(trainer, pl_module, {"test": as_loader_list(trainer.test_dataloaders)})

    # ------------------------------------------------------------------ tests
    def _check(self, trainer: Trainer, pl_module: LightningModule, current: Mapping[str, list[Any]]) -> None:
        self._tap.attach(pl_module)
        try:
            reference = self._embed(trainer, pl_module, self._reference_batches(trainer), gather=False)
            generator = torch.Generator().manual_seed(self.seed + trainer.current_epoch)
            projection = random_projection(reference["features"].shape[1], self.projections, self.seed)
            values: dict[str, float] = {}
            for name, loaders in current.items():
                parts = [self._embed(trainer, pl_module, loader, gather=True) for loader in loaders]
                data = {key: torch.cat([part[key] for part in parts]) for key in reference}
                data = _subset(data, self.current_size, generator)
                report = drift_tests(
                    reference, data, reference["logits"].shape[1], self.alpha, projection, self.permutations, generator
                )
                values.update(self._record(trainer, name, report))
        finally:
            self._tap.detach()
        pl_module.log_dict(values, sync_dist=False)  # equal on every rank: computed from gathered data

    def _embed(self, trainer: Trainer, pl_module: LightningModule, batches: Any, gather: bool) -> dict[str, Tensor]:
        return self._tap.embed(
            trainer, pl_module, batches, self.input_key, self.target_key, gather=gather, with_inputs=True
        )

    def _reference_batches(self, trainer: Trainer) -> list[Any]:
        if self.reference is not None:
            return list(self.reference)
        if self._reference_batches_drawn is None:
            self._reference_batches_drawn = self._draw(self._train_loader(trainer))
        return self._reference_batches_drawn

    @staticmethod
    def _train_loader(trainer: Trainer) -> Any:
        """The training data when this trainer has not trained (a test in new ddp_spawn workers, or alone)."""
        if getattr(trainer.train_dataloader, "dataset", None) is not None:
            return trainer.train_dataloader
        datamodule = trainer.datamodule
        source = datamodule.datamodule if isinstance(datamodule, RobustDataModule) else datamodule
        try:
            loader = split_loader(source, "train") if source is not None else None
        except Exception as error:  # a datamodule set up for testing only may fail in any way here
            raise RuntimeError(
                f"DriftMonitor needs training data as its reference, and {type(source).__name__}.train_dataloader() "
                f"failed outside fit ({error}). Pass reference=DataLoader(<trusted data>)."
            ) from error
        if getattr(loader, "dataset", None) is None:
            raise RuntimeError(
                "DriftMonitor draws its reference from the training data, but this trainer has none (trainer.validate "
                "or trainer.test without fit, on a datamodule without train_dataloader). "
                "Pass reference=DataLoader(<trusted data>)."
            )
        return loader

    def _draw(self, loader: Any) -> list[Any]:
        """The reference sample, drawn once and kept, so that testing after fit compares with the same one."""
        dataset = loader.dataset
        generator = torch.Generator().manual_seed(self.seed)
        ids = torch.randperm(len(dataset), generator=generator)[: self.reference_size].sort().values.tolist()
        size = loader.batch_size or 64
        batches = [loader.collate_fn([dataset[i] for i in ids[k : k + size]]) for k in range(0, len(ids), size)]
        # RobustDataModule's loaders carry the sample ids beside each batch.
        return [batch.batch if isinstance(batch, IdBatch) else batch for batch in batches]

    def _record(self, trainer: Trainer, name: str, report: DriftReport) -> dict[str, float]:
        tests = {test: [result.statistic, result.p_value] for test, result in report.tests.items()}
        record = {"epoch": trainer.current_epoch, "name": name, "tests": tests, "p": report.p_value}
        self.history.append({**record, "drift": report.drift})
        if report.drift:
            found = ", ".join(f"{test} p={p:.2g}" for test, (_, p) in tests.items() if p * len(tests) < self.alpha)
            rank_zero_warn(
                f"DriftMonitor: {name!r} data drifted from the training data at epoch {trainer.current_epoch} ({found})."
            )
        values = {f"drift/{name}/flag": float(report.drift), f"drift/{name}/p": report.p_value}
        for test, (statistic, p_value) in tests.items():
            values[f"drift/{name}/{test}"] = statistic
            values[f"drift/{name}/{test}_p"] = p_value
        return values

    # ------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        return {"history": [dict(record) for record in self.history]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = [dict(record) for record in state_dict["history"]]


def _subset(data: dict[str, Tensor], size: int, generator: torch.Generator) -> dict[str, Tensor]:
    if len(data["labels"]) <= size:
        return data
    keep = torch.randperm(len(data["labels"]), generator=generator)[:size].sort().values
    return {key: value[keep] for key, value in data.items()}
