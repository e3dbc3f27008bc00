"""Where the command's configs live, and the checks every composed config passes before anything runs."""

from __future__ import annotations

import difflib
import typing
from dataclasses import make_dataclass
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from lightning.pytorch import Trainer
from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import ValidationError


def _resource_dir(name: str) -> Path:
    packaged = Path(__file__).parent / name
    # A wheel carries conf/ and recipes/ inside the package; a source checkout has them at its top.
    return packaged if packaged.is_dir() else Path(__file__).parent.parent / name


CONFIG_DIR = _resource_dir("conf")
RECIPES_DIR = _resource_dir("recipes")


def register_recipes() -> list[str]:
    """Make every ``recipes/NAME.yaml`` an option of the ``recipe`` config group.

    Recipes live outside ``conf/`` so that users find them at the top of the repository; the
    config store is how Hydra takes a group from elsewhere under a name of our choosing.
    """
    store = ConfigStore.instance()
    names = []
    for path in sorted(RECIPES_DIR.glob("*.yaml")):
        store.store(group="recipe", name=path.stem, node=OmegaConf.load(path), package="_global_")
        names.append(path.stem)
    return names


# The top-level keys and their types; the groups (data, model, ...) are checked by what they build.
_TOP_LEVEL = {
    "purpose": str,
    "seed": int,
    "mode": str,
    "ckpt_path": str | None,
    "num_classes": int | None,
    **dict.fromkeys(
        ("data", "model", "trainer", "poison", "filter", "loss", "adversarial", "callbacks", "logger", "robust"), Any
    ),
}
_SIMPLE = (int, float, bool, str)


def _checkable(hint: Any) -> Any:
    """A type OmegaConf can check for a Trainer argument: int, bool, str, a number, or Any for the rest."""
    members = [m for m in typing.get_args(hint) if m is not type(None)] if typing.get_origin(hint) else [hint]
    if len(members) == 1 and members[0] in _SIMPLE:
        return members[0] | None
    if members and set(members) <= {int, float}:
        return float | None  # only checked, never written back: an int limit stays an int
    return Any


# From Lightning's own signature, so every Trainer argument is covered as Lightning types it.
_TRAINER = {
    name: _checkable(hint)
    for name, hint in typing.get_type_hints(Trainer.__init__).items()
    if name not in ("return", "callbacks", "logger")
}


def check_config(cfg: DictConfig) -> None:
    """Refuse unknown top-level keys and values of the wrong type, each named, before anything runs.

    Example:
        >>> check_config(OmegaConf.create({"seed": 0, "trainer": {"max_epochs": "abc"}}))
        Traceback (most recent call last):
        ...
        ValueError: Config key trainer.max_epochs has the wrong type: 'abc' is not a valid int. Fix: set trainer.max_epochs to a value of type int.
    """
    _check_keys(cfg)
    _check_types(cfg, _TOP_LEVEL, "")
    if isinstance(cfg.get("trainer"), DictConfig):
        _check_types(cfg.trainer, _TRAINER, "trainer.")


def _check_keys(cfg: DictConfig) -> None:
    unknown = sorted(set(cfg) - _TOP_LEVEL.keys())
    if unknown:
        hints = [
            f"{key!r} (did you mean {close[0]!r}?)"
            if (close := difflib.get_close_matches(key, list(_TOP_LEVEL), 1))
            else repr(key)
            for key in unknown
        ]
        raise ValueError(f"Unknown config key(s): {', '.join(hints)}. Known top-level keys: {sorted(_TOP_LEVEL)}.")


def _check_types(node: DictConfig, types: dict[str, Any], prefix: str) -> None:
    # Interpolations are checked once resolved, where they are used: some resolve only inside a Hydra run.
    present = {
        key: types[key] for key in node if types.get(key, Any) is not Any and not OmegaConf.is_interpolation(node, key)
    }
    schema = make_dataclass("Schema", [(key, hint, MISSING) for key, hint in present.items()])
    try:
        OmegaConf.merge(OmegaConf.structured(schema), {key: node[key] for key in present})
    except ValidationError as error:
        key = str(error.full_key)
        expected = typing.get_args(present[key])[0] if typing.get_origin(present[key]) else present[key]
        raise ValueError(
            f"Config key {prefix}{key} has the wrong type: {node[key]!r} is not a valid {expected.__name__}. "
            f"Fix: set {prefix}{key} to a value of type {expected.__name__}."
        ) from None
