"""Reading and replacing the input and the label inside a sample or a batch.

Users' samples come as tuples, lists or dicts. Everything in robust-lightning that needs
the inputs or the labels goes through these helpers, so that one rule decides where they are:
position 0 and 1 in a sequence, or the first conventional name found in a dict.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from torch import Tensor

Key = int | str

INPUT_NAMES = ("x", "input", "inputs", "image", "images", "img", "features", "data")
TARGET_NAMES = ("y", "label", "labels", "target", "targets", "class", "cls")


def resolve_key(structure: Any, key: Key | None, role: str) -> Key:
    """Return where the ``role`` ("input" or "target") lives in ``structure``.

    >>> resolve_key((1, 2), None, "target")
    1
    >>> resolve_key({"image": 0, "label": 1}, None, "input")
    'image'
    """
    if key is not None:
        return key
    if isinstance(structure, Mapping):
        names = INPUT_NAMES if role == "input" else TARGET_NAMES
        found = [name for name in names if name in structure]
        if not found:
            raise KeyError(
                f"Cannot tell which entry of the dict sample is the {role}: its keys are {list(structure)}, "
                f"and none is one of {list(names)}. Pass {role}_key='<your key>' to say which."
            )
        return found[0]
    if isinstance(structure, Sequence) and not isinstance(structure, str) and len(structure) >= 2:
        return 0 if role == "input" else 1
    raise TypeError(
        f"A sample or batch must be a tuple, a list or a dict holding inputs and labels, "
        f"got {type(structure).__name__}. Return (x, y) or {{'x': x, 'y': y}} from your dataset."
    )


def get_field(structure: Any, key: Key) -> Any:
    """Return the entry ``key`` of a tuple, list or dict."""
    return structure[key]


def replace_field(structure: Any, key: Key, value: Any) -> Any:
    """Return a copy of ``structure`` with entry ``key`` set to ``value``, keeping its type.

    >>> replace_field((1, 2), 1, 5)
    (1, 5)
    >>> replace_field({"x": 1, "y": 2}, "y", 5)
    {'x': 1, 'y': 5}
    """
    if isinstance(structure, Mapping):
        copy = dict(structure)
        copy[key] = value
        return type(structure)(copy) if type(structure) is not dict else copy
    items = list(structure)
    items[key] = value
    if isinstance(structure, tuple) and hasattr(structure, "_fields"):  # namedtuple
        return type(structure)(*items)
    return type(structure)(items)


def check_float_inputs(x: Any, owner: str) -> None:
    """Refuse inputs that ``owner`` cannot perturb, mix or augment: anything but a float tensor."""
    if not isinstance(x, Tensor) or not x.is_floating_point():
        dtype = f" of {x.dtype}" if isinstance(x, Tensor) else ""
        raise TypeError(f"{owner} needs the inputs as a float tensor, got {type(x).__name__}{dtype}.")


def check_owns_storage(x: Tensor, what: str) -> None:
    """Refuse a batch entry that is a view of a larger tensor: writing ``what`` into it would change the dataset."""
    if x._base is not None or x.untyped_storage().nbytes() != x.numel() * x.element_size():
        raise ValueError(
            f"This batch's inputs share memory with a larger tensor (e.g. a slice of your dataset's storage, from "
            f"DataLoader(batch_size=None) over pre-batched data), so writing the {what} into them in place would "
            "change your dataset. Have your dataset or collate_fn return copies (the default collate does)."
        )
