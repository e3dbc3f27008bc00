"""The ``robust-lightning`` command: a Hydra app that trains a recipe and reports per class."""

from __future__ import annotations

import json
import logging
import os
import sys
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import hydra
import torch
import yaml
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from lightning.pytorch import seed_everything
from lightning.pytorch.callbacks import Checkpoint, RichProgressBar
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf, open_dict

from robust_lightning.attacks import InputBounds
from robust_lightning.auditing import audit
from robust_lightning.callbacks import (
    EpochLines,
    PerClassMetrics,
    PoisonFilter,
    RobustEvaluation,
    RobustLoss,
    RunReport,
)
from robust_lightning.callbacks.per_class_metrics import METRICS
from robust_lightning.config import CONFIG_DIR, check_config, register_recipes
from robust_lightning.data import RobustDataModule
from robust_lightning.data.validation import split_dataset
from robust_lightning.poison import BackdoorTrigger, FeatureCollision, LabelConsistentBackdoor
from robust_lightning.report import per_class_table

log = logging.getLogger(__name__)

MODES = ("train", "test", "audit")


def run(cfg: DictConfig, run_dir: Path) -> dict[str, Any]:
    """Train and test, test or audit the configured run; return its test metrics or audit figures.

    Writes into ``run_dir``.
    """
    check_config(cfg)
    _check_mode(cfg)
    seed_everything(cfg.seed, workers=True)
    data = instantiate(cfg.data)
    _take_num_classes(cfg, data)
    run_dir.mkdir(parents=True, exist_ok=True)
    if rank_zero_only.rank == 0:  # one writer per run folder, which several nodes may share
        (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    poison = instantiate(cfg.poison) if cfg.get("poison") else None
    datamodule = RobustDataModule(data, poison=poison, num_classes=cfg.num_classes, **cfg.robust)
    model = instantiate(cfg.model)
    if cfg.mode == "audit":
        return _audit(model, datamodule, cfg.ckpt_path, run_dir)
    callbacks = _training_callbacks(cfg) if cfg.mode == "train" else _evaluation_callbacks(cfg, datamodule)
    title, config = f"robust-lightning {cfg.mode} report: {_recipe_name()}", OmegaConf.to_yaml(cfg, resolve=True)
    callbacks.append(RunReport(run_dir, title=title, config=config))
    callbacks += _progress_bar(cfg)
    trainer = instantiate(
        cfg.trainer, callbacks=callbacks, logger=instantiate(cfg.logger) if cfg.get("logger") else False
    )
    if cfg.mode == "train":
        trainer.fit(model, datamodule=datamodule, ckpt_path=cfg.ckpt_path)
        results = trainer.test(model, datamodule=datamodule, verbose=False)[0]
    else:
        results = trainer.test(model, datamodule=datamodule, ckpt_path=cfg.ckpt_path, verbose=False)[0]
    if trainer.is_global_zero:
        # Under ddp_spawn the parent holds the trained weights too: Lightning copies them back.
        results.update(_attack_success(poison, model, datamodule))
    if trainer.is_global_zero:
        (run_dir / "results.json").write_text(json.dumps(results, indent=1, sort_keys=True))
        print(_closing_report(trainer.callbacks, datamodule, results, run_dir))
    return results


def _attack_success(poison: Any, model: Any, datamodule: RobustDataModule) -> dict[str, float]:
    """The ASR of a drill that plants an attack: a trigger's on the test set, a feature collision's on its targets."""
    if isinstance(poison, (BackdoorTrigger, LabelConsistentBackdoor)):
        return {
            "test/attack_success_rate": poison.attack_success_rate(model, split_dataset(datamodule.datamodule, "test"))
        }
    if isinstance(poison, FeatureCollision):
        return {"test/attack_success_rate": poison.attack_success_rate(model)}
    return {}


def _check_mode(cfg: DictConfig) -> None:
    if cfg.mode not in MODES:
        raise ValueError(f"mode={cfg.mode!r} is not a mode: use one of {', '.join(MODES)}.")
    if cfg.mode != "train" and not cfg.ckpt_path:
        raise ValueError(f"mode={cfg.mode} reads a trained checkpoint: add ckpt_path=PATH, or ckpt_path=last.")


def _training_callbacks(cfg: DictConfig) -> list:
    callbacks = [instantiate(callback) for callback in cfg.callbacks.values()]
    if cfg.get("filter"):
        callbacks += _filter_callbacks(cfg.filter)
    if cfg.get("loss"):
        callbacks.append(RobustLoss(instantiate(cfg.loss)))
    if cfg.get("adversarial"):
        callbacks += [instantiate(callback) for callback in cfg.adversarial.values()]
    return callbacks


def _evaluation_callbacks(cfg: DictConfig, datamodule: RobustDataModule) -> list:
    """The run's callbacks that measure, with a PGD evaluation (RobustEvaluation's defaults) if it has none."""
    # No checkpointing: nothing trains.
    callbacks = [c for c in map(instantiate, cfg.callbacks.values()) if not isinstance(c, Checkpoint)]
    if cfg.get("adversarial"):
        callbacks += [
            callback
            for callback in map(instantiate, cfg.adversarial.values())
            if isinstance(callback, RobustEvaluation)
        ]
    if not any(isinstance(callback, RobustEvaluation) for callback in callbacks):
        callbacks.append(RobustEvaluation(cfg.num_classes, bounds=_evaluation_bounds(datamodule)))
    return callbacks


def _progress_bar(cfg: DictConfig) -> list:
    """Lightning's Rich bar on a terminal; one line per epoch in a log file, under nohup or in CI."""
    if not cfg.trainer.get("enable_progress_bar", True):
        return []
    return [RichProgressBar() if sys.stdout.isatty() else EpochLines()]


def _evaluation_bounds(datamodule: RobustDataModule) -> InputBounds:
    """[0, 1] for inputs that live there, as images do; otherwise each feature's range in the data."""
    seen = InputBounds.from_data(datamodule)
    return InputBounds() if seen.low.min() >= 0 and seen.high.max() <= 1 else seen


def _audit(model: Any, datamodule: RobustDataModule, ckpt_path: str, run_dir: Path) -> dict[str, Any]:
    model.load_state_dict(torch.load(ckpt_path, map_location="cpu", weights_only=False)["state_dict"])
    found = audit(model, datamodule, dirpath=run_dir, title=f"robust-lightning audit report: {_recipe_name()}")
    flagged = int(found.flags.sum())
    results = {"flagged": flagged, "samples": len(found.labels), **(found.quality or {})}
    (run_dir / "results.json").write_text(json.dumps(results, indent=1, sort_keys=True))
    line = f"The audit of {ckpt_path} flagged {flagged} of {len(found.labels)} training samples"
    if found.quality is not None:
        quality = found.quality
        line += (
            f": precision {quality['precision']:.2f}, recall {quality['recall']:.2f}, F1 {quality['f1']:.2f} "
            "against the drill"
        )
    print("\n".join([f"{line}.", *_folder_lines(run_dir)]))
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
        where = "its targets" if isinstance(datamodule.poison, FeatureCollision) else "the triggered test set"
        lines.append(f"Attack success rate on {where}: {100 * results['test/attack_success_rate']:.1f}%")
    lines += _filter_lines(next((c for c in callbacks if isinstance(c, PoisonFilter)), None))
    lines += [
        f"Trained with {type(c.loss).__name__} in place of the module's {c.attr} (RobustLoss)."
        for c in callbacks
        if isinstance(c, RobustLoss)
    ]
    return "\n".join(lines + _folder_lines(run_dir))


def _folder_lines(run_dir: Path) -> list[str]:
    files = sorted(
        str(p.relative_to(run_dir)) for p in run_dir.glob("*") if p.is_file() or p.name in ("checkpoints", "report")
    )
    lines = [f"Run folder: {run_dir.resolve()}", "  " + "  ".join(files)]
    if (run_dir / "report.html").exists():
        lines.append(f"Report with plots: {(run_dir / 'report.html').resolve()}")
    return lines


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
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)  # which build of faiss it loaded
    # Raised inside Lightning under recent torch; nothing a user of this command can change.
    warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated")


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="config")
def _hydra_main(cfg: DictConfig) -> None:
    _quiet_startup()
    hydra_cfg = HydraConfig.get()
    recipe = hydra_cfg.runtime.choices.get("recipe")
    log.info("Recipe %s: %s", recipe, cfg.purpose)
    if cfg.mode == "test":  # it tests the weights; the training callbacks' state has no use here
        warnings.filterwarnings("ignore", message=r"Be aware that when using `ckpt_path`, callbacks used to create")
    run(cfg, Path(hydra_cfg.runtime.output_dir))


def main() -> None:
    """Entry point of the ``robust-lightning`` console script."""
    register_recipes()
    sys.argv = checkpoint_arguments(launcher_arguments(sys.argv, os.environ))
    _hydra_main()


# Kept from a checkpoint's run: what the new command line says instead.
_NOT_CARRIED = ("ckpt_path", "mode", "hydra.run.dir")


def checkpoint_arguments(argv: list[str]) -> list[str]:
    """With ``ckpt_path=``, the command line of the checkpoint's own run, then this one's overrides.

    Hydra picks the run folder before the app starts, so a resumed run can only continue in its
    own folder (metrics.csv and the report then cover the whole run) if the command line says so:
    ``hydra.run.dir`` becomes the checkpoint's run folder (a ``test`` or ``audit`` subfolder of it
    for those modes), and the run's saved overrides come first, so that the data, the drill and the
    callbacks are the ones the checkpoint was trained with. A checkpoint from outside a run folder
    keeps the command line as it is, with the path made absolute.
    """
    given = _overrides(argv)
    # Lightning starts DDP's other processes with the rewritten command line: take it as it is.
    if "ckpt_path" not in given or given.get("hydra.job.name", "").startswith("train_ddp_process_"):
        return argv
    checkpoint = _find_checkpoint(given["ckpt_path"], given.get("hydra.run.dir"))
    folder = checkpoint.parent.parent
    saved = folder / ".hydra" / "overrides.yaml"
    ours = [arg for arg in argv[1:] if not arg.startswith(("ckpt_path=", "hydra.run.dir="))]
    if not saved.is_file():
        return [argv[0], *ours, f"ckpt_path={checkpoint}"]
    earlier, ours = _drop_removed(
        [arg for arg in yaml.safe_load(saved.read_text()) if _key(arg) not in _NOT_CARRIED], ours
    )
    mode = given.get("mode", "train")
    run_dir = folder if mode == "train" else folder / mode
    flags = next((i for i, arg in enumerate(ours) if "=" in arg and not arg.startswith("-")), len(ours))
    # Overrides after the flags (--config-dir DIR ...): argparse takes one block of them.
    return [argv[0], *ours[:flags], *earlier, f"hydra.run.dir={run_dir}", f"ckpt_path={checkpoint}", *ours[flags:]]


def _overrides(argv: list[str]) -> dict[str, str]:
    """The command line's ``KEY=VALUE`` overrides."""
    return dict(arg.split("=", 1) for arg in argv[1:] if "=" in arg and not arg.startswith("-"))


def _key(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+~")


def _drop_removed(earlier: list[str], ours: list[str]) -> tuple[list[str], list[str]]:
    """Our ``~KEY`` takes an earlier run's ``+KEY=...`` out of its list, since Hydra deletes before it adds."""
    removed = {arg[1:] for arg in ours if arg.startswith("~")}
    added = {_key(arg) for arg in earlier if arg.startswith("+") and _key(arg) in removed}
    return (
        [arg for arg in earlier if _key(arg) not in removed],
        [arg for arg in ours if not (arg.startswith("~") and arg[1:] in added)],
    )


def _find_checkpoint(value: str, run_dir: str | None) -> Path:
    if value != "last":
        path = Path(value)
        if not path.is_file():
            sys.exit(
                f"robust-lightning: ckpt_path={value}: no such checkpoint. Give a .ckpt file, such as "
                "runs/<time>/checkpoints/last.ckpt, or ckpt_path=last for the newest run's last checkpoint."
            )
        return path.resolve()
    found = (
        [Path(run_dir) / "checkpoints" / "last.ckpt"]
        if run_dir
        else sorted(Path("runs").glob("*/checkpoints/last.ckpt"), key=lambda p: p.stat().st_mtime)
    )
    if not found or not found[-1].is_file():
        where = f"{run_dir}/checkpoints/" if run_dir else "runs/*/checkpoints/"
        sys.exit(f"robust-lightning: ckpt_path=last: there is no last.ckpt under {where}. Give the checkpoint's path.")
    return found[-1].resolve()


def launcher_arguments(argv: list[str], env: Mapping[str, str]) -> list[str]:
    """The command line of a process that torchrun or srun started as one of several.

    Each such process composes its own config, so the run folder cannot be Hydra's timestamp: it
    becomes ``runs/JOB`` from the launcher's job id, unless ``hydra.run.dir`` or a checkpoint
    (``ckpt_path=PATH``) names it. Off rank 0, Hydra writes no ``.hydra/`` and logs to
    ``rank_N.log``, so that rank 0's files are the run's.
    """
    launched = _launched_rank(env)
    if launched is None:
        return argv
    rank, job = launched
    given = _overrides(argv)
    named = "hydra.run.dir" in given or given.get("ckpt_path", "null") not in ("null", "last")
    if not named and job is None:
        sys.exit(
            "robust-lightning: the processes of this run have no common run folder: torchrun was started without "
            "--rdzv-id. Start every node with the same --rdzv-id=NAME (the run goes to runs/NAME), or pass the same "
            "hydra.run.dir=FOLDER on every node."
        )
    folder = [] if named else [f"hydra.run.dir=runs/{job}"]
    quiet = [] if rank == 0 else ["hydra.output_subdir=null", f"hydra.job.name=rank_{rank}"]
    return [*argv, *folder, *quiet]


def _launched_rank(env: Mapping[str, str]) -> tuple[int, str | None] | None:
    """The global rank and job id that torchrun or srun gave this process; None for a single process."""
    if "TORCHELASTIC_RUN_ID" in env and int(env.get("WORLD_SIZE", "1")) > 1:
        run_id = env["TORCHELASTIC_RUN_ID"]
        return int(env["RANK"]), None if run_id == "none" else run_id  # "none": torchrun's default --rdzv-id
    if "SLURM_JOB_ID" in env and "SLURM_PROCID" in env and int(env.get("SLURM_NTASKS", "1")) > 1:
        return int(env["SLURM_PROCID"]), f"slurm-{env['SLURM_JOB_ID']}"
    return None


if __name__ == "__main__":
    main()
