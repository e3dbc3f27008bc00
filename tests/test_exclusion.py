"""Exclusion: honoured by the train sampler, reversible, identical across DDP ranks, kept in checkpoints."""

import json

import pytest
import torch
from helpers import DumpIdsPerEpoch, RecordingClassifier, SampleDataset, StructuredDigits, trainer_kwargs
from lightning.pytorch import Callback, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader

from robust_lightning import RobustDataModule
from robust_lightning.data.sampler import ExclusionSampler

EXCLUDED = [0, 5, 17, 300, 1292]


def test_excluded_ids_are_never_trained_on():
    dm = RobustDataModule(StructuredDigits())
    dm.setup("fit")
    dm.exclude(EXCLUDED)
    model = RecordingClassifier()
    Trainer(**trainer_kwargs(max_epochs=2)).fit(model, datamodule=dm)
    for ids in model.ids_by_epoch().values():
        assert sorted(ids) == sorted(set(range(dm.num_train)) - set(EXCLUDED))


class ExcludeThenInclude(Callback):
    def on_train_epoch_end(self, trainer, pl_module):
        dm = RobustDataModule.from_trainer(trainer)
        if trainer.current_epoch == 0:
            dm.exclude(torch.arange(0, 600))
        if trainer.current_epoch == 1:
            dm.include(torch.arange(0, 300))


def test_exclusion_during_fit_takes_effect_next_epoch_and_is_reversible():
    dm = RobustDataModule(StructuredDigits())
    model = RecordingClassifier()
    trainer = Trainer(**trainer_kwargs(max_epochs=3, callbacks=[ExcludeThenInclude()]))
    trainer.fit(model, datamodule=dm)
    epochs = model.ids_by_epoch()
    everything = set(range(dm.num_train))
    assert sorted(epochs[0]) == sorted(everything)
    assert sorted(epochs[1]) == sorted(everything - set(range(600)))
    assert sorted(epochs[2]) == sorted(everything - set(range(300, 600)))
    assert dm.excluded_ids.tolist() == list(range(300, 600))


class ExcludeOnEpochStart(Callback):
    def on_train_epoch_start(self, trainer, pl_module):
        if trainer.current_epoch == 1:
            RobustDataModule.from_trainer(trainer).exclude(range(100))


def test_an_exclusion_at_epoch_start_waits_for_the_next_epoch():
    dm = RobustDataModule(StructuredDigits())
    model = RecordingClassifier()
    Trainer(**trainer_kwargs(max_epochs=3, callbacks=[ExcludeOnEpochStart()])).fit(model, datamodule=dm)
    epochs = model.ids_by_epoch()
    assert len(epochs[1]) == dm.num_train, "the epoch already under way is not cut short"
    assert sorted(epochs[2]) == list(range(100, dm.num_train))


def test_exclusion_works_with_the_users_reload_setting_and_leaves_it_as_it_was():
    dm = RobustDataModule(StructuredDigits())
    model = RecordingClassifier()
    trainer = Trainer(
        **trainer_kwargs(max_epochs=4, reload_dataloaders_every_n_epochs=2, callbacks=[ExcludeThenInclude()])
    )
    trainer.fit(model, datamodule=dm)
    epochs = model.ids_by_epoch()
    everything = set(range(dm.num_train))
    assert set(epochs[1]) == everything - set(range(600))
    assert set(epochs[2]) == set(epochs[3]) == everything - set(range(300, 600))
    assert all(len(ids) == len(set(ids)) for ids in epochs.values())
    assert trainer.reload_dataloaders_every_n_epochs == 2


class ExcludeEveryEpoch(Callback):
    """Excludes one more id at each epoch end and, like user code may, asks for the train loader's length."""

    def on_train_epoch_end(self, trainer, pl_module):
        dm = RobustDataModule.from_trainer(trainer)
        dm.exclude([trainer.current_epoch])
        len(dm.train_dataloader())


def test_the_reload_setting_comes_back_even_when_exclusion_ends_the_run_or_the_loader_is_peeked():
    dm = RobustDataModule(StructuredDigits())
    model = RecordingClassifier()
    trainer = Trainer(**trainer_kwargs(max_epochs=3, callbacks=[ExcludeEveryEpoch()]))
    trainer.fit(model, datamodule=dm)
    assert trainer.reload_dataloaders_every_n_epochs == 0
    for epoch, ids in model.ids_by_epoch().items():
        assert set(ids) == set(range(epoch, dm.num_train)), "each exclusion is in force from the next epoch"
    second = Trainer(**trainer_kwargs(max_epochs=1, reload_dataloaders_every_n_epochs=2))
    second.fit(RecordingClassifier(), datamodule=dm)
    assert second.reload_dataloaders_every_n_epochs == 2


def test_a_train_set_that_changes_size_is_refused():
    class Growing(StructuredDigits):
        def train_dataloader(self):
            self.calls = getattr(self, "calls", 0) + 1
            grown = SampleDataset(self.train_set.x[: 100 * self.calls], self.train_set.y[: 100 * self.calls])
            return DataLoader(grown, batch_size=10, shuffle=True)

    dm = RobustDataModule(Growing())
    dm.setup("fit")
    with pytest.raises(RuntimeError, match="keep it the same size"):
        dm.train_dataloader()


def test_exclusion_rejects_unknown_ids_and_emptying_the_train_set():
    dm = RobustDataModule(StructuredDigits())
    dm.setup("fit")
    with pytest.raises(IndexError, match=r"\[1293\] do not exist"):
        dm.exclude([1293])
    with pytest.raises(ValueError, match="every training sample"):
        dm.exclude(range(dm.num_train))
    assert dm.excluded_ids.tolist() == []


@pytest.mark.parametrize(
    "ids, message",
    [
        (torch.arange(1293) < 3, r"torch.bool mask: pass the ids it marks, mask.nonzero\(\).flatten\(\)"),
        (torch.tensor([0, 1, 1], dtype=torch.uint8), "torch.uint8 mask"),
        ([1.5, 2.0], "torch.float32 numbers: pass integers"),
        (["a"], "not readable as integers"),
    ],
)
def test_ids_that_are_not_integers_are_refused_instead_of_rounded_or_read_as_zeros_and_ones(ids, message):
    dm = RobustDataModule(StructuredDigits())
    dm.setup("fit")
    dm.exclude([7])
    with pytest.raises(TypeError, match=message):
        dm.exclude(ids)
    with pytest.raises(TypeError, match=message):
        dm.include(ids)
    assert dm.excluded_ids.tolist() == [7], "nothing changed"
    dm.exclude([])  # nothing asked for is fine
    assert dm.excluded_ids.tolist() == [7]


def test_the_sampler_shards_one_permutation_across_ranks():
    excluded = torch.zeros(103, dtype=torch.bool)
    excluded[[1, 2, 50]] = True
    dataset = torch.zeros(103)
    ranks = [ExclusionSampler(dataset, excluded, seed=4, num_replicas=2, rank=r) for r in range(2)]
    for sampler in ranks:
        sampler.set_epoch(3)
    shards = [list(s) for s in ranks]
    assert len(shards[0]) == len(shards[1]) == len(ranks[0]) == 50
    assert set(shards[0]).isdisjoint(shards[1])
    assert set(shards[0]) | set(shards[1]) == set(range(103)) - {1, 2, 50}
    single = ExclusionSampler(dataset, excluded, seed=4)
    single.set_epoch(3)
    assert [i for pair in zip(*shards) for i in pair] == list(single)


def test_the_sampler_pads_every_rank_even_when_fewer_ids_remain_than_ranks():
    excluded = torch.ones(10, dtype=torch.bool)
    excluded[7] = False
    shards = [list(ExclusionSampler(torch.zeros(10), excluded, num_replicas=4, rank=r)) for r in range(4)]
    assert shards == [[7], [7], [7], [7]]


class StopAfter(Callback):
    def __init__(self, epoch):
        self.epoch = epoch

    def on_train_epoch_end(self, trainer, pl_module):
        if trainer.current_epoch == self.epoch:
            trainer.should_stop = True


def fit_recording(tmp_path, ckpt_path=None, stop_after=None):
    """Fit 4 epochs, excluding EXCLUDED after epoch 0; return the module and the datamodule."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    datamodule = RobustDataModule(StructuredDigits())
    model = RecordingClassifier()
    callbacks = [ModelCheckpoint(dirpath=tmp_path, save_last=True), DumpIdsPerEpoch(str(tmp_path), {0: EXCLUDED})]
    callbacks += [StopAfter(stop_after)] if stop_after is not None else []
    trainer = Trainer(
        **trainer_kwargs(max_epochs=4, enable_checkpointing=True, callbacks=callbacks, default_root_dir=tmp_path)
    )
    trainer.fit(model, datamodule=datamodule, ckpt_path=ckpt_path)
    return model, datamodule


def test_resume_restores_the_exclusion_mask_and_the_exact_sample_order(tmp_path):
    uninterrupted, _ = fit_recording(tmp_path / "whole")
    fit_recording(tmp_path / "killed", stop_after=1)
    resumed, datamodule = fit_recording(tmp_path / "resumed", ckpt_path=tmp_path / "killed" / "last.ckpt")
    assert datamodule.excluded_ids.tolist() == EXCLUDED
    assert sorted(resumed.ids_by_epoch()) == [2, 3]
    for epoch in (2, 3):
        assert resumed.ids_by_epoch()[epoch] == uninterrupted.ids_by_epoch()[epoch]
        assert set(resumed.ids_by_epoch()[epoch]) == set(range(datamodule.num_train)) - set(EXCLUDED)


def test_a_checkpoint_from_other_data_is_refused(tmp_path):
    dm = RobustDataModule(StructuredDigits())
    dm.setup("fit")
    dm.exclude([3])
    other = RobustDataModule(StructuredDigits(train_size=100))
    other.setup("fit")
    with pytest.raises(ValueError, match="covers 1293 training samples, but the train split has 100"):
        other.load_state_dict(dm.state_dict())


class ExcludePerRank(Callback):
    """Each rank flags ids of its own, as a detector on its shard would."""

    def on_train_epoch_end(self, trainer, pl_module):
        if trainer.current_epoch == 0:
            RobustDataModule.from_trainer(trainer).exclude(EXCLUDED[trainer.global_rank :: 2])


class ExcludeBadIdOnRankOne(Callback):
    def on_train_epoch_end(self, trainer, pl_module):
        RobustDataModule.from_trainer(trainer).exclude([99999] if trainer.global_rank == 1 else [3])


class ExcludeFloatsOnRankOne(Callback):
    def on_train_epoch_end(self, trainer, pl_module):
        RobustDataModule.from_trainer(trainer).exclude([3.5] if trainer.global_rank == 1 else [3])


@pytest.mark.slow
@pytest.mark.parametrize(
    "callback, message",
    [(ExcludeBadIdOnRankOne(), "do not exist"), (ExcludeFloatsOnRankOne(), "take training ids")],
)
def test_a_bad_id_on_one_rank_raises_on_every_rank_instead_of_hanging(callback, message):
    trainer = Trainer(**trainer_kwargs(devices=2, strategy="ddp_spawn", callbacks=[callback]))
    with pytest.raises(Exception, match=message):
        trainer.fit(RecordingClassifier(), datamodule=RobustDataModule(StructuredDigits()))


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp_spawn"])
def test_ddp_ranks_combine_their_exclusions_into_one_mask_and_split_the_included_ids(tmp_path, strategy):
    dm = RobustDataModule(StructuredDigits(batch_size=32))
    callbacks = [ExcludePerRank(), DumpIdsPerEpoch(str(tmp_path))]
    trainer = Trainer(
        **trainer_kwargs(max_epochs=2, devices=2, strategy=strategy, callbacks=callbacks, limit_val_batches=0)
    )
    trainer.fit(RecordingClassifier(), datamodule=dm)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert ranks[0]["excluded"] == ranks[1]["excluded"] == EXCLUDED
    for epoch, expected in (("0", set(range(1293))), ("1", set(range(1293)) - set(EXCLUDED))):
        a, b = ranks[0]["ids"][epoch], ranks[1]["ids"][epoch]
        assert len(a) == len(b), "equal steps on each rank"
        assert set(a) | set(b) == expected
        assert len(set(a) & set(b)) <= 1, "only the padding may repeat"
