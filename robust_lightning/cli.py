"""The ``robust-lightning`` command: a Hydra app that trains a recipe and reports per class."""

from __future__ import annotations

import difflib
import json
import logging
import warnings
from pathlib import Path
from typing import Any

import hydra
from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from lightning.pytorch import seed_everything
from omegaconf import DictConfig, OmegaConf, open_dict

from robust_lightning.callbacks import PerClassMetrics, PoisonFilter, RobustEvaluation, RobustLoss, RunReport
from robust_lightning.callbacks.per_class_metrics import METRICS
from robust_lightning.data import RobustDataModule
from robust_lightning.data.validation import split_dataset
from robust_lightning.poison import BackdoorTrigger
from robust_lightning.report import per_class_table

log = logging.getLogger(__name__)

KNOWN_KEYS = {
    "purpose",
    "seed",
    "num_classes",
    "data",
    "model",
    "trainer",
    "poison",
    "filter",
    "loss",
    "adversarial",
    "callbacks",
    "logger",
    "robust",
}


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


def check_keys(cfg: DictConfig) -> None:
    """Refuse top-level keys that nothing reads, such as a recipe's typo."""
    unknown = sorted(set(cfg) - KNOWN_KEYS)
    if unknown:
        hints = [
            f"{key!r} (did you mean {close[0]!r}?)"
            if (close := difflib.get_close_matches(key, KNOWN_KEYS, 1))
            else repr(key)
            for key in unknown
        ]
        raise ValueError(f"Unknown config key(s): {', '.join(hints)}. Known top-level keys: {sorted(KNOWN_KEYS)}.")


def run(cfg: DictConfig, run_dir: Path) -> dict[str, Any]:
    """Train and test the configured run; return its test metrics. Writes into ``run_dir``."""
    check_keys(cfg)
    seed_everything(cfg.seed, workers=True)
    data = instantiate(cfg.data)
    _take_num_classes(cfg, data)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    poison = instantiate(cfg.poison) if cfg.get("poison") else None
    datamodule = RobustDataModule(data, poison=poison, num_classes=cfg.num_classes, **cfg.robust)
    model = instantiate(cfg.model)
    callbacks = [instantiate(callback) for callback in cfg.callbacks.values()]
    if cfg.get("filter"):
        callbacks += _filter_callbacks(cfg.filter)
    if cfg.get("loss"):
        callbacks.append(RobustLoss(instantiate(cfg.loss)))
    if cfg.get("adversarial"):
        callbacks += [instantiate(callback) for callback in cfg.adversarial.values()]
    callbacks.append(RunReport(run_dir, title=f"robust-lightning run report: {_recipe_name()}"))
    trainer = instantiate(
        cfg.trainer, callbacks=callbacks, logger=instantiate(cfg.logger) if cfg.get("logger") else False
    )
    trainer.fit(model, datamodule=datamodule)
    results = trainer.test(model, datamodule=datamodule, verbose=False)[0]
    if isinstance(poison, BackdoorTrigger) and trainer.is_global_zero:
        # Under ddp_spawn the parent holds the trained weights too: Lightning copies them back.
        results["test/attack_success_rate"] = poison.attack_success_rate(
            model, split_dataset(datamodule.datamodule, "test")
        )
    if trainer.is_global_zero:
        (run_dir / "results.json").write_text(json.dumps(results, indent=1, sort_keys=True))
        print(_closing_report(trainer.callbacks, datamodule, results, run_dir))
    return results


def _take_num_classes(cfg: DictConfig, data: Any) -> None:
    """Set ``num_classes`` from the datamodule's attribute when the config leaves it out."""
    if "num_classes" in cfg and not OmegaConf.is_missing(cfg, "num_classes") and cfg.num_classes is not None:
        return
    value = getattr(data, "num_classes", None)
    if not isinstance(value, int) or isinstance(value, bool) or value < 2:
        raise ValueError(
            f"The number of classes is unknown: the config sets no num_classes and {type(data).__name__} has no "
            f"num_classes attribute (an integer >= 2; it has {value!r}). Add `num_classes: N` to your data config "
            "(at the top level, beside `data:`), or give the datamodule a num_classes attribute."
        )
    with open_dict(cfg):
        cfg.num_classes = value


def _filter_callbacks(group: DictConfig) -> list:
    if "_target_" in group:
        raise ValueError(
            "The filter config is one callback; it is now a set of named ones. Put it under a name, e.g. "
            "`poison_filter:` with the callback's keys indented below it (see conf/filter/default.yaml)."
        )
    return [instantiate(callback) for callback in group.values()]


def _closing_report(callbacks: list, datamodule: RobustDataModule, results: dict[str, float], run_dir: Path) -> str:
    """The per-class test table, the overall accuracy and the run folder.

    Built from the logged test metrics rather than from callback state, because under
    ``ddp_spawn`` only the logged metrics come back to this process.
    """
    lines = []
    metrics = next((c for c in callbacks if isinstance(c, PerClassMetrics)), None)
    if metrics is not None:
        values = {m: [results[f"test/{m}/{name}"] for name in metrics.class_names] for m in METRICS}
        extra = {}
        if f"test/robust_accuracy/{metrics.class_names[0]}" in results:
            extra["robust acc"] = [
                f"{100 * results[f'test/robust_accuracy/{name}']:.1f}" for name in metrics.class_names
            ]
        if datamodule.summary is not None:
            extra["support"] = datamodule.summary.counts["test"]
            if datamodule.summary.poisoned is not None:
                extra["poisoned in train"] = datamodule.summary.poisoned
        lines += ["", "Test results per class (%):", per_class_table(values, metrics.class_names, extra)]
    if "test/acc" in results:
        lines.append(f"Test accuracy: {100 * results['test/acc']:.1f}%")
    robust = next((c for c in callbacks if isinstance(c, RobustEvaluation)), None)
    if robust is not None and "test/robust_accuracy/macro" in results:
        name = robust.attack if isinstance(robust.attack, str) else "the given attack"
        lines.append(
            f"Robust accuracy ({name}, {robust.steps} steps, eps {robust.eps}): "
            f"{100 * results['test/robust_accuracy/macro']:.1f}% (mean over classes)"
        )
    if "test/attack_success_rate" in results:
        lines.append(f"Attack success rate on the triggered test set: {100 * results['test/attack_success_rate']:.1f}%")
    lines += _filter_lines(next((c for c in callbacks if isinstance(c, PoisonFilter)), None))
    lines += [
        f"Trained with {type(c.loss).__name__} in place of the module's {c.attr} (RobustLoss)."
        for c in callbacks
        if isinstance(c, RobustLoss)
    ]
    files = sorted(
        str(p.relative_to(run_dir)) for p in run_dir.glob("*") if p.is_file() or p.name in ("checkpoints", "report")
    )
    lines += [f"Run folder: {run_dir.resolve()}", "  " + "  ".join(files)]
    if (run_dir / "report.html").exists():
        lines.append(f"Report with plots: {(run_dir / 'report.html').resolve()}")
    return "\n".join(lines)


def _filter_lines(filter_: PoisonFilter | None) -> list[str]:
    if filter_ is None or not filter_.rounds:  # no round ran, or they ran in ddp_spawn workers
        return []
    last = filter_.rounds[-1]
    line = f"PoisonFilter flagged {last['flagged']} training samples (last round, epoch {last['epoch']})"
    if "f1" in last:
        line += (
            f": precision {last['precision']:.2f}, recall {last['recall']:.2f}, F1 {last['f1']:.2f} against the drill"
        )
    return [line + "; see flagged.csv."]


def _recipe_name() -> str:
    return HydraConfig.get().runtime.choices.get("recipe") if HydraConfig.initialized() else "custom config"


def _quiet_startup() -> None:
    """Send our log records to the handlers Hydra set up, and drop warnings that need no action here."""
    package_logger = logging.getLogger("robust_lightning")
    package_logger.handlers.clear()
    package_logger.propagate = True
    # Hydra writes .hydra/ and cli.log into the run folder before the CSV logger adds metrics.csv there.
    warnings.filterwarnings("ignore", message=r"Experiment logs directory .* exists and is not empty")
    # Raised inside Lightning under recent torch; nothing a user of this command can change.
    warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated")


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="config")
def _hydra_main(cfg: DictConfig) -> None:
    _quiet_startup()
    hydra_cfg = HydraConfig.get()
    recipe = hydra_cfg.runtime.choices.get("recipe")
    log.info("Recipe %s: %s", recipe, cfg.purpose)
    run(cfg, Path(hydra_cfg.runtime.output_dir))


def main() -> None:
    """Entry point of the ``robust-lightning`` console script."""
    register_recipes()
    _hydra_main()


if __name__ == "__main__":
    main()
