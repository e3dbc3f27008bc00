"""Property-based tests of RobustDataModule's validation: every bad sample is named, no good one is touched."""

import math

import torch
from helpers import ListDataset
from hypothesis import given, settings
from hypothesis import strategies as st
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader

from robust_lightning import RobustDataModule
from robust_lightning.data import DataValidationError

NUM_CLASSES, WIDTH = 4, 3
# Enough to show every bad id: the message names the first 10 of a kind.
MAX_BAD = 10


class SplitsModule(LightningDataModule):
    """Train, val and test splits given as lists of ``(x, y)`` samples."""

    def __init__(self, train, val, test):
        super().__init__()
        self.splits = {"train": train, "val": val, "test": test}

    def _loader(self, name):
        return DataLoader(ListDataset(self.splits[name]), batch_size=4)

    def train_dataloader(self):
        return self._loader("train")

    def val_dataloader(self):
        return self._loader("val")

    def test_dataloader(self):
        return self._loader("test")


def clean_split(draw, size):
    values = st.floats(-1e3, 1e3, allow_nan=False, width=32)
    xs = draw(st.lists(st.lists(values, min_size=WIDTH, max_size=WIDTH), min_size=size, max_size=size))
    ys = draw(st.lists(st.integers(0, NUM_CLASSES - 1), min_size=size, max_size=size))
    return [(torch.tensor(x, dtype=torch.float32), torch.tensor(y)) for x, y in zip(xs, ys)]


# What can be wrong with one sample, and how the error words it.
DEFECTS = {
    "nan": ("have NaN or inf values", lambda x, y, v: (x.index_fill(0, torch.tensor([v % WIDTH]), math.nan), y)),
    "inf": ("have NaN or inf values", lambda x, y, v: (x.index_fill(0, torch.tensor([v % WIDTH]), -math.inf), y)),
    "label_high": ("have a label that is not an integer", lambda x, y, v: (x, torch.tensor(NUM_CLASSES + v))),
    "label_negative": ("have a label that is not an integer", lambda x, y, v: (x, torch.tensor(-1 - v))),
    "float_label": ("have a label that is not an integer", lambda x, y, v: (x, y.float())),
    "ragged": ("differ in shape or dtype", lambda x, y, v: (torch.cat([x, x[: 1 + v % WIDTH]]), y)),
    "dtype": ("differ in shape or dtype", lambda x, y, v: (x.double(), y)),
}


@st.composite
def damaged_data(draw):
    """Three splits with some samples of one split damaged; which ids and how."""
    sizes = {name: draw(st.integers(MAX_BAD + 1, 24)) for name in ("train", "val", "test")}
    splits = {name: clean_split(draw, size) for name, size in sizes.items()}
    split = draw(st.sampled_from(sorted(splits)))
    kind = draw(st.sampled_from(sorted(DEFECTS)))
    # A minority of the split, so the odd samples are the damaged ones whatever the damage.
    count = draw(st.integers(1, min(MAX_BAD, (sizes[split] - 1) // 2)))
    ids = sorted(draw(st.sets(st.integers(0, sizes[split] - 1), min_size=count, max_size=count)))
    for i in ids:
        x, y = splits[split][i]
        splits[split][i] = DEFECTS[kind][1](x, y, draw(st.integers(0, 5)))
    return splits, split, kind, ids


@settings(max_examples=150, deadline=None)
@given(damaged_data())
def test_every_damaged_sample_is_named_by_id_with_the_fix(case):
    splits, split, kind, ids = case
    datamodule = RobustDataModule(SplitsModule(**splits), num_classes=NUM_CLASSES)
    stage = "test" if split == "test" else "fit"  # a bad test split stops testing, not training
    try:
        datamodule.setup(stage)
    except DataValidationError as error:
        message = str(error)
    else:
        raise AssertionError(f"{kind} damage to {split} ids {ids} passed validation")
    line = next(line for line in message.splitlines() if line.startswith(f"- {split}: {len(ids)} sample(s)"))
    assert f"(ids {', '.join(map(str, ids))})" in line and DEFECTS[kind][0] in line and "Fix:" in line


@st.composite
def clean_data(draw):
    return {name: clean_split(draw, draw(st.integers(1, 12))) for name in ("train", "val", "test")}


@settings(max_examples=60, deadline=None)
@given(clean_data())
def test_clean_data_passes_every_sample_through_unchanged_and_in_order(splits):
    datamodule = RobustDataModule(SplitsModule(**splits), num_classes=NUM_CLASSES)
    datamodule.setup("fit")
    seen = [(x, y, ids) for (x, y), ids in datamodule.inspection_dataloader()]
    xs, ys, ids = (torch.cat(column) for column in zip(*seen))
    assert ids.tolist() == list(range(len(splits["train"])))
    assert torch.equal(xs, torch.stack([x for x, _ in splits["train"]]))
    assert torch.equal(ys, torch.stack([y for _, y in splits["train"]]))
    val = [sample for x, y in datamodule.val_dataloader() for sample in zip(x, y)]
    assert all(torch.equal(a, c) and torch.equal(b, d) for (a, b), (c, d) in zip(val, splits["val"], strict=True))


@settings(max_examples=20, deadline=None)
@given(st.sampled_from(["train", "val", "test"]), clean_data())
def test_an_empty_split_is_refused_by_name(split, splits):
    splits[split] = []
    datamodule = RobustDataModule(SplitsModule(**splits), num_classes=NUM_CLASSES)
    try:
        datamodule.setup("test" if split == "test" else "fit")
    except DataValidationError as error:
        assert f"The {split} split is empty. Fix:" in str(error)
    else:
        raise AssertionError(f"an empty {split} split passed validation")
