"""RobustDataModule: wraps any LightningDataModule with sample ids, exclusion, drills and validation."""

from __future__ import annotations

import logging
import operator
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import LightningDataModule, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_only, rank_zero_warn
from lightning_utilities.core.overrides import is_overridden
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from robust_lightning.data.fields import Key, get_field, resolve_key
from robust_lightning.data.loader import IdBatch, IndexedDataset, loader_shuffles, rebuild_loader
from robust_lightning.data.sampler import ExclusionSampler
from robust_lightning.data.validation import (
    DataSummary,
    DataValidationError,
    SplitScan,
    scan_split,
    split_dataset,
    split_loader,
    summarize,
)
from robust_lightning.integrity.access import data_folders, writable_paths
from robust_lightning.integrity.manifest import IntegrityError, Manifest, mismatch_message
from robust_lightning.losses.sample_state import PerSampleLoss
from robust_lightning.poison.base import InjectionPoison, InputPoison, LabelPoison

log = logging.getLogger(__name__)

# The wrapper must override this hook to strip the ids, and then calls the module's own version
# itself, so Lightning's warning that only the datamodule's hook runs does not apply.
warnings.filterwarnings("ignore", message="You have overridden `on_before_batch_transfer` in both")

# Hooks whose mere presence on a datamodule changes what Lightning does (a val loop runs only if
# val_dataloader is overridden, the datamodule's transfer hooks shadow the module's), so the
# wrapper exposes exactly those the wrapped datamodule overrides.
_MIRRORED_HOOKS = (
    "val_dataloader",
    "test_dataloader",
    "predict_dataloader",
    "transfer_batch_to_device",
    "on_after_batch_transfer",
)


class RobustDataModule(LightningDataModule):
    """Wrap any LightningDataModule to give callbacks sample ids, exclusion, drills and data checks.

    * Each training sample's id is its position in the wrapped train dataset. The ids of the
      batch being trained on are in :attr:`batch_ids`; the batch itself reaches ``training_step``
      exactly as the wrapped datamodule's loader builds it.
    * :meth:`exclude` and :meth:`include` flip a mask that the train sampler honours from the next
      epoch on, on every DDP rank alike. Nothing is deleted, and the mask is saved in checkpoints.
    * ``poison`` applies a drill (e.g. :class:`~robust_lightning.poison.PairFlip`) to the train split
      only; :attr:`poison_mask` is its ground truth.
    * ``validate`` checks every split at setup and logs a :class:`DataSummary`. At fit time the test
      split is set up too, to count exact duplicates between train and test.

    Args:
        datamodule: the LightningDataModule to wrap. Its train_dataloader() must return a plain
            ``DataLoader``, shuffled or not.
        poison: a drill from :mod:`robust_lightning.poison`, or None.
        validate: raise :class:`~robust_lightning.data.validation.DataValidationError` on NaN or inf
            values, labels outside ``[0, num_classes)``, mismatched shapes or dtypes and empty splits.
        num_classes: number of classes; defaults to ``datamodule.num_classes``.
        target_key: where the label is in a sample: an index or a dict key. By default position 1
            of a tuple or list, or a key such as ``"label"``, ``"target"`` or ``"y"`` of a dict.
        input_key: where the input is, for drills that change inputs (e.g.
            :class:`~robust_lightning.poison.BackdoorTrigger`); by default position 0 or a key
            such as ``"image"`` or ``"x"``.
        seed: seeds the shuffling of the train sampler (with the epoch number).
        manifest: a :class:`~robust_lightning.integrity.Manifest` or the path of one saved by
            ``robust-lightning-manifest create``. Each split it records is verified when it is first
            read, before training or testing on it.
        on_mismatch: ``"error"`` raises :class:`~robust_lightning.integrity.IntegrityError` naming
            every changed, relabelled, added, removed and moved sample id; ``"warn"`` warns alike and
            goes on.
        public_key: the data owner's Ed25519 public key (``robust-lightning-manifest keygen``'s
            public.pem). The manifest must then carry that owner's signature over its exact content,
            or nothing starts. Training only verifies: it never needs the private key.
        writable_data: with a manifest, what to do if this process can write to the data files
            the datamodule names (its ``root`` or ``data_dir``): ``"error"`` (refuse, naming them)
            or ``"warn"``. Whoever can write the data could change it unseen and write a new manifest.

    Example:
        >>> from robust_lightning.data import DigitsDataModule
        >>> from robust_lightning.poison import PairFlip
        >>> dm = RobustDataModule(DigitsDataModule(), poison=PairFlip({4: 8, 8: 4}, rate=0.4))
        >>> dm.setup("fit")
        >>> int(dm.poison_mask.sum()), dm.num_train
        (102, 1293)
        >>> dm.exclude([0, 1, 2]); dm.excluded_ids.tolist()
        [0, 1, 2]
    """

    def __init__(
        self,
        datamodule: LightningDataModule,
        poison: LabelPoison | InjectionPoison | None = None,
        validate: bool = True,
        num_classes: int | None = None,
        target_key: Key | None = None,
        seed: int = 0,
        input_key: Key | None = None,
        manifest: str | Path | Manifest | None = None,
        on_mismatch: str = "error",
        public_key: str | Path | None = None,
        writable_data: str = "error",
    ) -> None:
        super().__init__()
        for name, value in (("on_mismatch", on_mismatch), ("writable_data", writable_data)):
            if value not in ("error", "warn"):
                raise ValueError(f"{name} must be 'error' or 'warn', got {value!r}.")
        if public_key is not None and manifest is None:
            raise ValueError("public_key verifies a manifest's signature: pass manifest=... (the signed manifest) too.")
        if not isinstance(datamodule, LightningDataModule):
            raise TypeError(f"RobustDataModule wraps a LightningDataModule, got {type(datamodule).__name__}.")
        if poison is not None and not isinstance(poison, (LabelPoison, InjectionPoison)):
            raise TypeError(f"poison must be a drill from robust_lightning.poison, got {type(poison).__name__}.")
        own = getattr(datamodule, "num_classes", None)
        if num_classes is not None and isinstance(own, int) and own != num_classes:
            raise ValueError(
                f"The number of classes disagrees: num_classes={num_classes} is given, but "
                f"{type(datamodule).__name__}.num_classes is {own}. Fix: give num_classes={own} (and a model with "
                f"{own} outputs), or leave num_classes out to take the datamodule's."
            )
        num_classes = num_classes if num_classes is not None else own
        try:
            num_classes = operator.index(num_classes)
        except TypeError:
            num_classes = None
        if num_classes is None or num_classes < 1:
            raise ValueError(
                "RobustDataModule needs the number of classes as a positive integer. "
                "Pass num_classes=... or give your datamodule a num_classes attribute."
            )
        self.datamodule = datamodule
        # Loggers record the wrapped datamodule's hyperparameters, as they would without the wrapper.
        self.save_hyperparameters(datamodule.hparams_initial)
        self.prepare_data_per_node = datamodule.prepare_data_per_node
        self.poison = poison
        self.validate = validate
        self.num_classes = num_classes
        self.target_key = target_key
        self.input_key = input_key
        self.seed = seed
        self.manifest_source = None if manifest is None or isinstance(manifest, Manifest) else str(manifest)
        self.manifest = Manifest.load(manifest) if self.manifest_source is not None else manifest
        if public_key is not None:
            self.manifest.check_signature(public_key, self.manifest_source or "given")
        self.on_mismatch = on_mismatch
        self.writable_data = writable_data
        self._access_checked = False
        self.batch_ids: Tensor | None = None
        self.poison_mask: Tensor | None = None
        self.summary: DataSummary | None = None
        self._excluded: Tensor | None = None
        self._restored_excluded: Tensor | None = None
        self._pending_reload: tuple[Trainer, int] | None = None
        self._train: IndexedDataset | None = None
        self._collate: Callable[[list], Any] | None = None
        self._scans: dict[str, SplitScan] = {}
        self._mismatches: dict[str, str] = {}  # split -> what the manifest check found
        for hook in _MIRRORED_HOOKS:
            if is_overridden(hook, datamodule, LightningDataModule):
                setattr(self, hook, getattr(datamodule, hook))

    @staticmethod
    def from_trainer(trainer: Trainer, by: str = "This") -> RobustDataModule:
        """The RobustDataModule the trainer runs with; an error naming ``by`` and the fix if there is none."""
        datamodule = trainer.datamodule
        if not isinstance(datamodule, RobustDataModule):
            raise TypeError(
                f"{by} needs sample ids, which come from RobustDataModule. Wrap your datamodule: "
                "trainer.fit(model, datamodule=RobustDataModule(your_datamodule))."
            )
        return datamodule

    # ----------------------------------------------------------------- setup
    def prepare_data(self) -> None:
        self.datamodule.prepare_data()

    def setup(self, stage: str) -> None:
        self.datamodule.trainer = self.trainer
        self.datamodule.setup(stage)
        if self.manifest is not None and not self._access_checked:
            self._check_access()
        if stage == "fit":
            self._setup_train()
            self._bind_per_sample_losses()
        elif stage in ("validate", "test") and self._reads_splits:
            self._scan({"validate": "val", "test": "test"}[stage])
        if self.trainer is not None and all(
            is_overridden("on_before_batch_transfer", owner, parent)
            for owner, parent in (
                (self.datamodule, LightningDataModule),
                (self.trainer.lightning_module, LightningModule),
            )
        ):
            rank_zero_warn(
                "Both your LightningModule and your LightningDataModule override `on_before_batch_transfer`; "
                "as without RobustDataModule, only the datamodule's runs."
            )

    def teardown(self, stage: str) -> None:
        if stage == "fit" and self._pending_reload is not None:
            self._end_forced_reload(force=True)
        self.datamodule.teardown(stage)

    def _setup_train(self) -> None:
        if self._train is not None:
            return
        base = self._user_train_loader()[0].dataset
        labels = None
        if self._reads_splits or self.poison is not None:
            train = self._scan("train", base)
        poison_input = injected = None
        if isinstance(self.poison, InputPoison):
            poison_input = self._prepare_input_poison(base, train.labels)
        if isinstance(self.poison, InjectionPoison):
            injected, labels = self._inject(base, train.labels)
        elif self.poison is not None:
            labels, self.poison_mask = self.poison(train.labels, self.num_classes)
        if self._reads_splits:
            self._scan("val")
            if is_overridden("test_dataloader", self.datamodule, LightningDataModule):
                self.datamodule.setup("test")
                # Read now for the train/test overlap; its problems stop trainer.test, not training.
                self._scan("test", strict=False)
        if self.validate:
            poisoned_labels = (
                None if self.poison_mask is None else _original_labels(train.labels, labels)[self.poison_mask]
            )
            self.summary = summarize(self._scans, self.num_classes, poisoned_labels)
            _log_summary(self.summary, self.poison)
        target_key = resolve_key(base[0], self.target_key, "target")
        self._train = IndexedDataset(base, target_key, labels, self.poison_mask, poison_input, injected)
        self._excluded = torch.zeros(len(self._train), dtype=torch.bool)
        if self._restored_excluded is not None:
            self._apply_restored(self._restored_excluded)

    def _bind_per_sample_losses(self) -> None:
        """Give losses with per-sample state (e.g. ELRLoss as the module's criterion) this module's ids."""
        if self.trainer is not None:
            for loss in self.trainer.lightning_module.modules():
                if isinstance(loss, PerSampleLoss):
                    loss.bind(self)

    def _tensor_inputs(self, base: Dataset) -> tuple[Key, Any]:
        """Where the train samples' input is, and a reader of the stacked inputs of given ids."""
        input_key = resolve_key(base[0], self.input_key, "input")
        if not isinstance(get_field(base[0], input_key), Tensor):
            raise TypeError(
                f"{type(self.poison).__name__} changes inputs and needs them as torch tensors, but the train "
                f"samples' input is a {type(get_field(base[0], input_key)).__name__}. Convert it in your dataset "
                "(e.g. torchvision's ToTensor), or pass input_key=... if the input is another entry."
            )
        return input_key, lambda ids: torch.stack([get_field(base[int(i)], input_key) for i in ids])

    def _prepare_input_poison(self, base: Dataset, labels: Tensor) -> tuple[Key, Any]:
        input_key, read_inputs = self._tensor_inputs(base)
        self.poison.prepare(read_inputs, labels)
        return input_key, self.poison.poison_input

    def _inject(self, base: Dataset, labels: Tensor) -> tuple[tuple[Key, Tensor, Tensor], Tensor]:
        """The injection drill's samples, after the base ones; the labels and the ground truth of all."""
        input_key, read_inputs = self._tensor_inputs(base)
        injection = self.poison.inject(read_inputs, labels, self.num_classes)
        self.poison_mask = torch.cat(
            [torch.zeros(len(labels), dtype=torch.bool), torch.ones(len(injection.labels), dtype=torch.bool)]
        )
        return (input_key, injection.sources, injection.inputs), torch.cat([labels, injection.labels])

    def _user_train_loader(self) -> tuple[DataLoader, bool]:
        """The wrapped datamodule's train loader, and whether it shuffles; refused before any data is read."""
        loader = split_loader(self.datamodule, "train")
        if loader is None:
            raise TypeError(f"{type(self.datamodule).__name__} has no train_dataloader(); training needs one.")
        return loader, loader_shuffles(loader)

    def _scan(self, split: str, dataset: Dataset | None = None, strict: bool = True) -> SplitScan | None:
        """Read a split once (cached); raise its problems, or with ``strict=False`` warn about them."""
        if split not in self._scans:
            dataset = dataset if dataset is not None else split_dataset(self.datamodule, split)
            if dataset is None:
                return None
            progress = rank_zero_only.rank == 0
            self._scans[split] = scan_split(split, dataset, self.num_classes, self.target_key, False, progress)
            self._verify(split, strict)
        if strict and self.on_mismatch == "error" and split in self._mismatches:
            raise IntegrityError(self._mismatches[split])
        scan = self._scans[split]
        if self.validate and scan.problems:
            error = DataValidationError.of(scan.problems)
            if strict:
                raise error
            rank_zero_warn(str(error))
        return scan

    @property
    def _reads_splits(self) -> bool:
        return self.validate or self.manifest is not None

    def _check_access(self) -> None:
        """Refuse (or warn about) data files this process could write, since it could then rewrite them unseen."""
        self._access_checked = True
        folders = data_folders(self.datamodule)
        if not folders:
            _log_on_rank_zero(
                f"{type(self.datamodule).__name__} names no data files (no root or data_dir attribute): "
                "whether training could write to its data was not checked."
            )
            return
        writable = writable_paths(folders)
        if not writable:
            return
        shown = ", ".join(map(str, writable[:3])) + (f" and {len(writable) - 3} more" if len(writable) > 3 else "")
        message = (
            f"This process can write to {len(writable)} of the data paths it reads ({shown}): it could change the "
            "data and the manifest alike. Fix: mount the data read-only, or give it to another owner and drop "
            "write permission (chmod -R a-w); or pass writable_data='warn' (robust.writable_data=warn) to go on."
        )
        if self.writable_data == "error":
            raise IntegrityError(message)
        rank_zero_warn(message)

    def _verify(self, split: str, strict: bool) -> None:
        """Check a split against the manifest; an error waits for a strict read (the test split's, at test).

        A split the manifest lacks is an error at once: an emptied or partial manifest verifies nothing.
        """
        if self.manifest is None:
            return
        self.manifest.require_splits([split], self.manifest_source or "given")
        diffs = {name: diff for name, diff in self.manifest.verify({split: self._scans[split]}).items() if diff}
        if not diffs:
            return
        self._mismatches[split] = mismatch_message(diffs, self.manifest_source or "given")
        if self.on_mismatch == "warn" or not strict:
            rank_zero_warn(self._mismatches[split])

    # ------------------------------------------------------------- loaders
    def train_dataloader(self) -> DataLoader:
        train = self._require_train()
        user_loader, shuffle = self._user_train_loader()
        if len(user_loader.dataset) != train.num_base:
            raise RuntimeError(
                f"train_dataloader() now returns {len(user_loader.dataset)} samples, but setup saw {train.num_base}. "
                "RobustDataModule fixes the training set at setup (ids, checks, drills): keep it the same size."
            )
        # The same samples in a new dataset object (rebuilt per call, with fresh augmentation): train on it.
        train.base = user_loader.dataset
        self._collate = user_loader.collate_fn
        trainer = self.trainer
        shards = (trainer.distributed_sampler_kwargs if trainer is not None else None) or {}
        sampler = ExclusionSampler(
            train,
            self._excluded.clone(),  # this loader's epochs see the mask as it is now
            shuffle=shuffle,
            seed=self.seed,
            num_replicas=shards.get("num_replicas", 1),
            rank=shards.get("rank", 0),
        )
        return rebuild_loader(user_loader, train, sampler)

    def inspection_dataloader(self) -> DataLoader:
        """Every training sample once, in id order and excluded ones included: this rank's share under DDP.

        Batches are :class:`~robust_lightning.data.loader.IdBatch` ``(batch, ids)``, the batch built
        as the user's loader builds it. Detectors read the whole training set through it.
        """
        train = self._require_train()
        user_loader, _ = self._user_train_loader()
        shards = (self.trainer.distributed_sampler_kwargs if self.trainer is not None else None) or {}
        sampler = ExclusionSampler(
            train,
            torch.zeros(len(train), dtype=torch.bool),
            shuffle=False,
            num_replicas=shards.get("num_replicas", 1),
            rank=shards.get("rank", 0),
        )
        return rebuild_loader(user_loader, train, sampler, drop_last=False)

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        if isinstance(batch, IdBatch):
            self.batch_ids = batch.ids
            batch = batch.batch
            if self._pending_reload is not None:
                self._end_forced_reload()
        if is_overridden("on_before_batch_transfer", self.datamodule, LightningDataModule):
            return self.datamodule.on_before_batch_transfer(batch, dataloader_idx)
        if self.trainer is not None:
            return self.trainer.lightning_module.on_before_batch_transfer(batch, dataloader_idx)
        return batch

    # ------------------------------------------------------------ exclusion
    @property
    def current_epoch(self) -> int:
        """The epoch being trained (0 before fit), for losses that change with training time."""
        return self.trainer.current_epoch if self.trainer is not None else 0

    def training_sample(self, index: int) -> Any:
        """The training sample with this id, as training sees it (with the drill's changes)."""
        sample, _ = self._require_train()[index]
        return sample

    def training_batch(self, ids: Tensor) -> Any:
        """These training ids as one batch, collated as the training loader collates (excluded ids included).

        Samples are read one by one in this process, not by the loader's workers.
        """
        if self._collate is None:
            raise RuntimeError("training_batch() needs the training loader: call it while fitting.")
        train = self._require_train()
        return self._collate([train[i][0] for i in torch.as_tensor(ids).tolist()])

    @property
    def train_labels(self) -> Tensor:
        """The label of every training id as training sees it: the drill's, injected samples included."""
        train = self._require_train()
        if train.labels is not None:
            return train.labels.clone()
        return self._scan("train", train.base).labels.clone()

    @property
    def num_train(self) -> int:
        return len(self._require_train())

    @property
    def excluded(self) -> Tensor:
        """A copy of the exclusion mask over the training ids."""
        self._require_train()
        return self._excluded.clone()

    @property
    def excluded_ids(self) -> Tensor:
        return self.excluded.nonzero().flatten()

    def exclude(self, ids: Any) -> None:
        """Leave these training ids out from the next epoch on.

        Under DDP this is a collective: call it on every rank. The ids asked for on all ranks are
        combined, so every rank keeps the same mask.
        """
        self._set_excluded(ids, True)

    def include(self, ids: Any) -> None:
        """Bring excluded training ids back from the next epoch on. Under DDP, as :meth:`exclude`."""
        self._set_excluded(ids, False)

    def _set_excluded(self, ids: Any, value: bool) -> None:
        self._require_train()
        requested = self._agreed_request(*_as_ids(ids))
        mask = self._excluded.clone()
        mask[requested] = value
        if bool(mask.all()):
            raise ValueError("This would exclude every training sample; at least one must stay.")
        self._excluded = mask
        trainer = self.trainer
        if trainer is not None and trainer.state.fn == "fit" and self._pending_reload is None:
            # Lightning sizes an epoch when it builds the train loader, so it must build a new one. Have it
            # reload at the next epoch; the user's setting comes back once that loader is in use.
            self._pending_reload = (trainer, trainer.reload_dataloaders_every_n_epochs)
            trainer.reload_dataloaders_every_n_epochs = 1

    def _agreed_request(self, ids: Tensor, problem: str | None) -> Tensor:
        """The ids asked for on all ranks, as a mask; every rank raises alike if any asked for bad ids."""
        last = len(self._excluded) - 1
        outside = ids[(ids < 0) | (ids > last)]
        requested = torch.zeros(len(self._excluded) + 2, dtype=torch.int32)
        requested[ids[(ids >= 0) & (ids <= last)]] = 1
        requested[-2] = len(outside)
        requested[-1] = problem is not None
        trainer = self.trainer
        if trainer is not None and trainer.world_size > 1:
            # On the strategy's device: NCCL gathers CUDA tensors only.
            requested = trainer.strategy.all_gather(requested.to(trainer.strategy.root_device)).sum(0).cpu()
        if requested[-1]:
            what = f"were {problem}" if problem else "on another rank were not integers"
            raise TypeError(f"exclude() and include() take training ids, but the ids {what}. Nothing was changed.")
        if requested[-2]:
            where = f"{outside[:10].tolist()}" if len(outside) else "asked for on another rank"
            raise IndexError(f"Training ids {where} do not exist: ids run from 0 to {last}.")
        return requested[:-2] > 0

    def _end_forced_reload(self, force: bool = False) -> None:
        """Give the user's reload setting back once Lightning trains from a loader with the current mask."""
        trainer, setting = self._pending_reload
        sampler = getattr(trainer.train_dataloader, "sampler", None)
        current = isinstance(sampler, ExclusionSampler) and torch.equal(sampler.excluded, self._excluded)
        if force or current:
            trainer.reload_dataloaders_every_n_epochs = setting
            self._pending_reload = None

    def _require_train(self) -> IndexedDataset:
        if self._train is None:
            raise RuntimeError("The training split is not set up yet: call setup('fit') first (Trainer.fit does).")
        return self._train

    # ---------------------------------------------------------- checkpoints
    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"datamodule": self.datamodule.state_dict()}
        if self._excluded is not None:
            state["excluded"] = self._excluded.clone()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.datamodule.load_state_dict(state_dict.get("datamodule", {}))
        if "excluded" not in state_dict:
            return
        if self._excluded is None:
            self._restored_excluded = state_dict["excluded"]
        else:
            self._apply_restored(state_dict["excluded"])

    def _apply_restored(self, excluded: Tensor) -> None:
        if len(excluded) != len(self._excluded):
            raise ValueError(
                f"The checkpoint's exclusion mask covers {len(excluded)} training samples, but the train split has "
                f"{len(self._excluded)}. Resume with the same data as the run that saved the checkpoint."
            )
        self._excluded = excluded.clone()


def _as_ids(ids: Any) -> tuple[Tensor, str | None]:
    """The ids as a flat integer tensor, or why they are not ids: nothing is rounded or reinterpreted."""
    none = torch.empty(0, dtype=torch.long)
    try:
        tensor = torch.as_tensor(ids)
    except (TypeError, ValueError, RuntimeError) as error:
        return none, f"not readable as integers ({error})"
    if tensor.numel() == 0:
        return none, None
    if tensor.dtype in (torch.bool, torch.uint8):  # torch itself indexes with a uint8 tensor as with a mask
        return none, f"a {tensor.dtype} mask: pass the ids it marks, mask.nonzero().flatten()"
    if tensor.is_floating_point() or tensor.is_complex():
        return none, f"{tensor.dtype} numbers: pass integers"
    return tensor.long().flatten(), None


def _original_labels(before: Tensor, after: Tensor) -> Tensor:
    """The label each sample had before the drill: its own, or for an injected sample the one it was given."""
    return torch.cat([before, after[len(before) :]])


@rank_zero_only
def _log_summary(summary: DataSummary, poison: LabelPoison | InjectionPoison | None) -> None:
    drill = f"poisoned with {poison!r}\n" if poison is not None else ""
    log.info("Data summary (samples per class):\n%s%s", drill, summary)


@rank_zero_only
def _log_on_rank_zero(message: str) -> None:
    log.info(message)
