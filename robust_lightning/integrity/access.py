"""Least privilege: whether the training process can write to the data files it reads.

A manifest stops silent changes only if whoever changes the data cannot also re-create the
manifest; read-only data keeps the training job itself from being that someone.
"""

from __future__ import annotations

import os
from pathlib import Path

from lightning.pytorch import LightningDataModule

# Where datamodules commonly keep their folder: torchvision-style ``root``, Lightning examples' ``data_dir``.
_FOLDER_ATTRIBUTES = ("root", "data_dir", "root_dir", "data_path")


def data_folders(datamodule: LightningDataModule) -> list[Path]:
    """The existing folders or files that ``datamodule`` names as its data, from its attributes or hparams.

    Example:
        >>> from robust_lightning.data import DigitsDataModule
        >>> data_folders(DigitsDataModule())  # the digits are embedded: no files to name
        []
    """
    found = []
    for name in _FOLDER_ATTRIBUTES:
        for value in (getattr(datamodule, name, None), datamodule.hparams.get(name)):
            if isinstance(value, (str, os.PathLike)) and Path(value).exists() and Path(value) not in found:
                found.append(Path(value))
    return found


def writable_paths(roots: list[Path]) -> list[Path]:
    """Every file and folder under ``roots`` (they included) that this process may write to.

    A writable folder counts as much as a writable file: whoever can write it can replace the files in it.

    Example:
        >>> import tempfile
        >>> folder = Path(tempfile.mkdtemp())
        >>> writable_paths([folder]) == [folder]  # its owner may write to it
        True
    """
    paths = []
    for root in roots:
        paths.append(root)
        if root.is_dir():
            for folder, dirs, files in os.walk(root):
                paths += [Path(folder, name) for name in (*dirs, *files)]
    return [path for path in paths if os.access(path, os.W_OK)]
