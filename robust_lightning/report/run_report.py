"""The run report: what a run learnt, found and flagged, as report.md and a self-contained report.html."""

from __future__ import annotations

import base64
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jinja2
import torch
from lightning.pytorch import LightningModule, Trainer

from robust_lightning.callbacks.drift_monitor import DriftMonitor
from robust_lightning.callbacks.per_class_metrics import PerClassMetrics
from robust_lightning.callbacks.poison_filter import PoisonFilter
from robust_lightning.callbacks.robust_evaluation import RobustEvaluation
from robust_lightning.data.fields import get_field, resolve_key
from robust_lightning.data.robust import RobustDataModule
from robust_lightning.data.validation import split_dataset
from robust_lightning.detectors import Decision
from robust_lightning.poison import BackdoorTrigger
from robust_lightning.report import plots

SUSPICIOUS_SHOWN = 24


@dataclass
class Section:
    """One part of the report: text, an optional table and an optional figure."""

    title: str
    text: list[str] = field(default_factory=list)
    table: tuple[list[str], list[list[Any]]] | None = None
    bullets: list[str] = field(default_factory=list)
    figure: Path | None = None
    code: str | None = None

    @property
    def anchor(self) -> str:
        return re.sub(r"[^a-z0-9]+", "-", self.title.lower()).strip("-")


def _first(trainer: Trainer, kind: type, exact: bool = False) -> Any:
    found = (c for c in trainer.callbacks if (type(c) is kind if exact else isinstance(c, kind)))
    return next(found, None)


def _latest(history: list[dict[str, Any]], stage: str | None = None) -> dict[str, Any] | None:
    """The last record of ``stage``, or with None the last evaluation of either stage."""
    return next((record for record in reversed(history) if stage in (None, record["stage"])), None)


# ------------------------------------------------------------------------------------------ sections
def _summary(trainer: Trainer, pl_module: LightningModule) -> Section:
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("test/") and v.numel() == 1}
    rows = [[name, f"{100 * metrics[key]:.1f}%"] for key, name in _HEADLINES.items() if key in metrics]
    datamodule = trainer.datamodule
    # The drill's trigger exists once the train split is set up (not in ddp_spawn's test-only workers).
    backdoor = isinstance(datamodule, RobustDataModule) and isinstance(datamodule.poison, BackdoorTrigger)
    if backdoor and datamodule.poison_mask is not None:
        test_set = split_dataset(datamodule.datamodule, "test")
        if test_set is not None:
            asr = datamodule.poison.attack_success_rate(pl_module, test_set)
            rows.append(["attack success rate on the triggered test set", f"{100 * asr:.1f}%"])
    text = [f"Model {type(pl_module).__name__}, trained {trainer.current_epoch} epochs ({trainer.global_step} steps)."]
    if isinstance(datamodule, RobustDataModule) and datamodule.poison_mask is not None:
        text.append(f"Drill: {datamodule.poison!r}, {int(datamodule.poison_mask.sum())} training samples poisoned.")
    return Section("Summary", text, (["metric", "value"], rows) if rows else None)


_HEADLINES = {
    "test/acc": "test accuracy (logged by the module)",
    "test/accuracy/macro": "test accuracy (mean over classes)",
    "test/f1/macro": "test F1 (mean over classes)",
    "test/robust_accuracy/macro": "robust test accuracy (mean over classes)",
}


def _per_class(metrics: PerClassMetrics, folder: Path) -> list[Section]:
    sections = []
    val = [record for record in metrics.history if record["stage"] == "val"]
    if val:
        alerts = [f"epoch {r['epoch']}: {alert}" for r in val for alert in r.get("alerts", [])]
        text = [f"{len(alerts)} class alert(s) were raised." if alerts else "No class alert was raised."]
        if metrics.restarts:
            text.append(f"The model or its classifier head restarted at epoch(s) {metrics.restarts} (dashed lines).")
        figure = plots.per_class_accuracy(val, metrics.class_names, folder / "per_class_accuracy.png", metrics.restarts)
        sections.append(Section("Per-class accuracy across epochs", text, bullets=alerts[:30], figure=figure))
    latest = _latest(metrics.history)  # a test run before fit must not stand for the model that fit trained
    if latest is not None:
        stage = {"test": "test", "val": "validation"}[latest["stage"]]
        title = f"Confusion matrix ({stage}, epoch {latest['epoch']})"
        figure = plots.confusion_matrix(latest["confusion"], metrics.class_names, title, folder / "confusion.png")
        header = ["class", "accuracy", "precision", "recall", "F1", "support"]
        rows = [
            [
                name,
                *(f"{100 * latest[m][c]:.1f}" for m in ("accuracy", "precision", "recall", "f1")),
                latest["support"][c],
            ]
            for c, name in enumerate(metrics.class_names)
        ]
        sections.append(Section(title, [f"Per class, in percent, on the {stage} set."], (header, rows), figure=figure))
    return sections


def _robust(metrics: PerClassMetrics, robust: RobustEvaluation, folder: Path) -> Section | None:
    clean, attacked = _latest(metrics.history), _latest(robust.history, "test")
    if clean is None or clean["stage"] != "test" or attacked is None:
        return None
    attack = robust.attack if isinstance(robust.attack, str) else "the given attack"
    title = f"Robust accuracy per class ({attack}, eps {robust.eps}, {robust.steps} steps)"
    figure = plots.robust_accuracy(
        clean["accuracy"], attacked["accuracy"], metrics.class_names, title, folder / "robust_accuracy.png"
    )
    mean = 100 * attacked["macro"]["accuracy"]
    return Section(title, [f"Test accuracy under attack: {mean:.1f}% on average over classes."], figure=figure)


def _filter(filter_: PoisonFilter, trainer: Trainer, pl_module: LightningModule, folder: Path) -> list[Section]:
    if filter_.flags is None or not filter_.rounds:
        return [Section("Poisoned-sample filter", ["PoisonFilter ran no detection round in this run."])]
    datamodule = RobustDataModule.from_trainer(trainer, by="The run report's filter section")
    scores, flags = filter_.scores.numpy(), filter_.flags.numpy()
    poisoned = datamodule.poison_mask.numpy() if datamodule.poison_mask is not None else None
    last = filter_.rounds[-1]
    text = [f"The last round (epoch {last['epoch']}) flagged {last['flagged']} of {len(flags)} training samples."]
    if "f1" in last:
        text.append(
            f"Against the drill's ground truth: precision {last['precision']:.3f}, recall {last['recall']:.3f}, "
            f"F1 {last['f1']:.3f}."
        )
    rows = [
        [r["epoch"], r["flagged"], *(f"{r[k]:.3f}" for k in ("precision", "recall", "f1") if k in r)]
        for r in filter_.rounds
    ]
    header = ["epoch", "flagged"] + (["precision", "recall", "F1"] if "f1" in last else [])
    histogram = plots.score_histogram(
        scores, None if poisoned is None else poisoned.astype(bool), flags.astype(bool), folder / "filter_scores.png"
    )
    sections = [Section("Poisoned-sample filter: scores", text, (header, rows), figure=histogram)]
    sections.append(
        suspicious(
            filter_.scores, datamodule, pl_module, folder, filter_.input_key, filter_.target_key, filter_.decision
        )
    )
    return sections


@torch.no_grad()
def suspicious(
    scores: torch.Tensor,
    datamodule: RobustDataModule,
    pl_module: LightningModule,
    folder: Path,
    input_key: Any = None,
    target_key: Any = None,
    decision: Decision | None = None,
) -> Section:
    """The training samples of the highest ``scores`` as a table (id, labels, score, detector); images also as a grid."""
    order = torch.argsort(scores, descending=True)[:SUSPICIOUS_SHOWN].tolist()
    samples = [datamodule.training_sample(i) for i in order]
    input_key = resolve_key(samples[0], input_key, "input")
    target_key = resolve_key(samples[0], target_key, "target")
    inputs = torch.stack([torch.as_tensor(get_field(s, input_key)) for s in samples])
    was_training = pl_module.training
    pl_module.eval()
    predicted = pl_module(inputs.to(pl_module.device, pl_module.dtype)).argmax(1).tolist()
    pl_module.train(was_training)
    given = [int(get_field(s, target_key)) for s in samples]
    poisoned = datamodule.poison_mask
    header = ["id", "given label", "predicted", "score"]
    columns = [order, given, predicted, [f"{float(scores[i]):.4g}" for i in order]]
    if decision is not None:
        header.append("flagged by")
        columns.append([source or "-" for source in decision.sources(torch.tensor(order))])
    if poisoned is not None:
        header.append("poisoned by the drill")
        columns.append(["yes" if poisoned[i] else "no" for i in order])
    section = Section(
        "Most suspicious training samples",
        [f"The {len(order)} highest suspicion scores, highest first."],
        (header, [list(row) for row in zip(*columns)]),
    )
    if inputs.ndim >= 3:  # images: a grid is worth looking at; a feature vector is not
        captions = [
            f"#{i} {g}→{p}" + ("*" if poisoned is not None and poisoned[i] else "")
            for i, g, p in zip(order, given, predicted)
        ]
        title = "#id given→predicted" + (" (* poisoned by the drill)" if poisoned is not None else "")
        images = inputs.float().numpy()
        images = images[:, None] if images.ndim == 3 else images  # (N, H, W): one channel
        section.figure = plots.sample_grid(images, captions, title, folder / "suspicious_samples.png")
    return section


def _drift(monitor: DriftMonitor, folder: Path) -> Section | None:
    if not monitor.history:
        return None
    figure = plots.drift_statistics(monitor.history, monitor.alpha, folder / "drift.png")
    latest = {record["name"]: record for record in monitor.history}
    header = ["data", "epoch", *next(iter(latest.values()))["tests"], "overall p", "drift"]
    rows = [
        [
            name,
            r["epoch"],
            *(f"{p:.2g}" for _, p in r["tests"].values()),
            f"{r['p']:.2g}",
            "yes" if r["drift"] else "no",
        ]
        for name, r in latest.items()
    ]
    text = [f"p-values of the latest check of each dataset; drift is flagged when the overall p < {monitor.alpha}."]
    return Section("Drift", text, (header, rows), figure=figure)


def report_sections(
    trainer: Trainer,
    pl_module: LightningModule,
    folder: Path,
    config: str | None = None,
    history: Sequence[dict[str, float]] = (),
) -> list[Section]:
    """Every section the run's callbacks have evidence for; figures are drawn into ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    sections = [_summary(trainer, pl_module)]
    if history:
        figure = plots.training_curves(history, folder / "training_curves.png")
        sections.append(
            Section("Loss and accuracy", ["The mean training loss of each epoch, and what was logged."], figure=figure)
        )
    metrics = _first(trainer, PerClassMetrics, exact=True)
    if metrics is not None:
        sections += _per_class(metrics, folder)
    robust = _first(trainer, RobustEvaluation)
    if metrics is not None and robust is not None:
        sections.append(_robust(metrics, robust, folder))
    filter_ = _first(trainer, PoisonFilter)
    if filter_ is not None:
        sections += _filter(filter_, trainer, pl_module, folder)
    monitor = _first(trainer, DriftMonitor)
    if monitor is not None:
        sections.append(_drift(monitor, folder))
    if config is not None:
        sections.append(Section("Configuration", ["The run's resolved configuration."], code=config))
    return [section for section in sections if section is not None]


# --------------------------------------------------------------------------------------- rendering
def _md(value: Any) -> str:
    """Text as Markdown shows it literally: backslash escapes for markup, raw HTML and the ``|`` of table cells.

    Backslash escapes read as the characters themselves in the file too, where HTML entities
    (``&lt;``) would show as entities.
    """
    return re.sub(r"([\\`*|<>\[\]])", r"\\\1", str(value))


def render_markdown(title: str, sections: list[Section], root: Path) -> str:
    lines = [f"# {_md(title)}", ""]
    for section in sections:
        lines += [f"## {_md(section.title)}", ""]
        lines += [*(_md(line) for line in section.text), ""]
        if section.table is not None:
            header, rows = section.table
            lines += ["| " + " | ".join(map(_md, header)) + " |", "|" + "---|" * len(header)]
            lines += ["| " + " | ".join(map(_md, row)) + " |" for row in rows]
            lines.append("")
        lines += [f"- {_md(bullet)}" for bullet in section.bullets] + ([""] if section.bullets else [])
        if section.code is not None:
            lines += ["```yaml", section.code.rstrip(), "```", ""]
        if section.figure is not None:
            lines += [f"![{_md(section.title)}]({section.figure.relative_to(root).as_posix()})", ""]
    return "\n".join(lines)


# Jinja2 escapes every value by default: titles, labels and cells cannot inject markup.
_TEMPLATES = jinja2.Environment(
    loader=jinja2.PackageLoader("robust_lightning.report", "templates"),
    autoescape=True,
    trim_blocks=True,
    undefined=jinja2.StrictUndefined,
)
_TEMPLATES.filters["embed"] = lambda figure: base64.b64encode(figure.read_bytes()).decode()
_TEMPLATES.filters["relative"] = lambda figure, root: figure.relative_to(root).as_posix()


def render_html(title: str, sections: list[Section], root: Path) -> str:
    """One HTML file that carries its figures inline (base64), so it can be mailed or archived alone."""
    return _TEMPLATES.get_template("report.html.j2").render(title=title, sections=sections, root=root)


def write_report(
    trainer: Trainer,
    pl_module: LightningModule | None = None,
    dirpath: str | Path | None = None,
    title: str = "Run report",
    config: str | None = None,
    history: Sequence[dict[str, float]] = (),
) -> Path:
    """Write ``report.md``, ``report.html`` and the figures under ``report/`` into ``dirpath``; return the HTML's path.

    ``dirpath`` defaults to the trainer's log folder. Call it on rank zero after ``fit`` or ``test``.
    """
    pl_module = pl_module if pl_module is not None else trainer.lightning_module
    root = Path(dirpath if dirpath is not None else (trainer.log_dir or trainer.default_root_dir))
    return write_sections(report_sections(trainer, pl_module, root / "report", config, history), root, title)


def write_sections(sections: list[Section], root: Path, title: str) -> Path:
    """``report.md`` and ``report.html`` of ``sections`` (their figures drawn under ``root/report``)."""
    drawn = {section.figure for section in sections if section.figure is not None}
    for stale in set((root / "report").glob("*.png")) - drawn:  # a figure an earlier write drew, this one not
        stale.unlink()
    (root / "report.md").write_text(render_markdown(title, sections, root))
    path = root / "report.html"
    path.write_text(render_html(title, sections, root))
    return path
