"""The run report: every figure is drawn, decodes as a PNG, and is carried by report.html and report.md."""

from __future__ import annotations

import re

import pytest
from helpers import ReportPage, check_report, trainer_kwargs
from lightning.pytorch import Trainer, seed_everything

from robust_lightning import RobustDataModule
from robust_lightning.callbacks import DriftMonitor, PerClassMetrics, PoisonFilter, RobustEvaluation, RunReport
from robust_lightning.data import DigitsDataModule
from robust_lightning.models import SmallCNN
from robust_lightning.poison import PairFlip
from robust_lightning.report.run_report import write_report

FIGURES = {
    "training_curves.png",
    "per_class_accuracy.png",
    "confusion.png",
    "filter_scores.png",
    "suspicious_samples.png",
    "robust_accuracy.png",
    "drift.png",
}


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    seed_everything(0)
    folder = tmp_path_factory.mktemp("report")
    callbacks = [
        PerClassMetrics(num_classes=10),
        RobustEvaluation(num_classes=10, eps=0.1, steps=2),
        PoisonFilter(start_epoch=2, every_n_epochs=1, restart=None, dirpath=folder),
        DriftMonitor(every_n_epochs=1, permutations=100),
        RunReport(folder, title="Test report"),
    ]
    trainer = Trainer(**trainer_kwargs(max_epochs=3, callbacks=callbacks))
    datamodule = RobustDataModule(DigitsDataModule(), poison=PairFlip({4: 8, 8: 4}, rate=0.4))
    model = SmallCNN()
    trainer.fit(model, datamodule=datamodule)
    trainer.test(model, datamodule=datamodule, verbose=False)
    return folder, trainer


def test_a_run_with_every_callback_gets_every_figure(full_run):
    folder, _ = full_run
    assert check_report(folder) == FIGURES
    page = (folder / "report.html").read_text()
    for heading in ("Summary", "Per-class accuracy across epochs", "Confusion matrix (test, epoch 3)", "Drift"):
        assert f"<h2>{heading}</h2>" in page
    assert "Against the drill&#39;s ground truth: precision" in page
    assert "test accuracy (logged by the module)" in page


def test_the_report_can_be_written_on_request(full_run, tmp_path):
    _, trainer = full_run
    path = write_report(trainer, dirpath=tmp_path)
    assert path == tmp_path / "report.html"
    assert check_report(tmp_path) == FIGURES - {"training_curves.png"}, "the curves are RunReport's own record"


def test_a_run_without_filter_or_attack_gets_the_figures_it_has_evidence_for(full_run, tmp_path):
    write_report(full_run[1], dirpath=tmp_path)  # an earlier report in the same folder: its extra figures go
    trainer = Trainer(**trainer_kwargs(max_epochs=2, callbacks=[PerClassMetrics(10), RunReport(tmp_path)]))
    trainer.fit(SmallCNN(), datamodule=DigitsDataModule())
    assert check_report(tmp_path) == {"training_curves.png", "per_class_accuracy.png", "confusion.png"}
    assert "Confusion matrix (validation, epoch 1)" in (tmp_path / "report.md").read_text()


def test_the_report_follows_the_latest_evaluation_and_shows_names_literally(tmp_path):
    names = ["<b>zero</b>", "a|b", "$x_", "_background", "[x](javascript:alert(1))", *map(str, range(5, 10))]
    metrics = PerClassMetrics(10, class_names=names)
    trainer = Trainer(**trainer_kwargs(max_epochs=2, callbacks=[metrics, RunReport(tmp_path)]))
    model = SmallCNN()
    trainer.test(model, datamodule=DigitsDataModule(), verbose=False)  # a baseline before training
    trainer.fit(model, datamodule=DigitsDataModule())
    markdown = (tmp_path / "report.md").read_text()
    assert "Confusion matrix (validation, epoch 1)" in markdown, "the trained model's, not the baseline's"
    assert "| \\<b\\>zero\\</b\\> |" in markdown and "| a\\|b |" in markdown
    assert "<td>&lt;b&gt;zero&lt;/b&gt;</td>" in (tmp_path / "report.html").read_text()
    # No link a name could smuggle in: Markdown's ](...) only escaped, HTML's links all the report's own.
    assert "\\[x\\](javascript:alert(1))" in markdown and not re.search(r"(?<!\\)\]\(javascript:", markdown)
    links = ReportPage((tmp_path / "report.html").read_text()).links
    assert links and all(link.startswith(("#", "data:image/png;base64,")) for link in links), links
    assert check_report(tmp_path) == {"training_curves.png", "per_class_accuracy.png", "confusion.png"}


def test_the_per_class_plot_keeps_every_class_in_its_legend(tmp_path):
    from robust_lightning.report import plots

    history = [{"epoch": 0, "accuracy": [1.0, 0.5], "macro": {"accuracy": 0.75}}]
    seen = []
    original = plots.Figure.savefig

    def spy(figure, *args, **kwargs):
        seen.extend(text.get_text().strip() for text in figure.axes[0].get_legend().get_texts())
        return original(figure, *args, **kwargs)

    plots.Figure.savefig = spy
    try:
        plots.per_class_accuracy(history, ["_background", "$cat"], tmp_path / "a.png")
    finally:
        plots.Figure.savefig = original
    assert seen == ["_background", "$cat", "macro"]


def test_log_scale_plots_label_their_ticks_in_plain_numbers(tmp_path, monkeypatch):
    import numpy as np

    from robust_lightning.report import plots

    labels = []
    original = plots.Figure.savefig

    def spy(figure, *args, **kwargs):
        result = original(figure, *args, **kwargs)  # drawn: the tick labels have their text
        labels.extend(label.get_text() for axes in figure.axes for label in axes.get_yticklabels())
        return result

    monkeypatch.setattr(plots.Figure, "savefig", spy)
    scores = np.linspace(0, 1, 200)
    plots.score_histogram(scores, scores > 0.9, scores > 0.8, tmp_path / "scores.png")
    history = [{"name": "val", "epoch": e, "tests": {"ks": (0.1, 10.0**-e)}} for e in range(4)]
    plots.drift_statistics(history, 0.05, tmp_path / "drift.png")
    assert labels and not [label for label in labels if "$" in label or "mathdefault" in label]
