"""docs/pages/own-project.md as a user follows it: its files written into an empty folder, its commands run there."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import ReportPage

PAGE = Path(__file__).parent.parent / "docs" / "pages" / "own-project.md"
BLOCK = re.compile(r'```(\w+)(?: title="([^"]+)")?\n(.*?)```', re.DOTALL)


def page():
    """The files the page asks the user to write, and its bash blocks: each a list of commands run in turn."""
    files, blocks = {}, []
    for language, title, body in BLOCK.findall(PAGE.read_text()):
        if title:
            files[title] = body
        elif language == "bash":
            blocks.append([line for line in body.splitlines() if line.strip()])
    return files, blocks


FILES, BLOCKS = page()
COMMANDS = [command for block in BLOCKS for command in block]
# Two processes, 40 epochs of the recipes' filter on images, or four runs in a row: minutes on 2 cores.
SLOW = ("trainer=ddp_cpu", "filter=default", "ckpt_path=")


def test_the_page_has_both_projects_in_python_on_the_command_line_and_under_ddp():
    assert {"mytab/data.py", "mytab/model.py", "train_tabular.py", "myimg/project.py"} <= set(FILES)
    assert any("python train_tabular.py" in c for c in COMMANDS)
    assert sum("--config-dir myconf recipe=" in c for c in COMMANDS) == 3
    assert any("trainer=ddp_cpu" in c for c in COMMANDS)
    assert any("ckpt_path=last mode=test" in c for c in COMMANDS) and any("mode=audit" in c for c in COMMANDS)


@pytest.mark.parametrize(
    "block",
    [pytest.param(b, marks=pytest.mark.slow) if any(s in c for c in b for s in SLOW) else b for b in BLOCKS],
    ids=lambda block: block[-1].removeprefix("PYTHONPATH=. "),
)
def test_each_block_of_the_page_runs_from_an_empty_folder(block, tmp_path):
    for name, text in FILES.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    for command in block:
        result = subprocess.run(
            ["bash", "-c", command], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900, check=False
        )
        assert result.returncode == 0, result.stderr[-3000:]
        check_output(command, result.stdout, tabular=any("tabular" in c for c in block))


def check_output(command: str, stdout: str, tabular: bool) -> None:
    """What each kind of command must print and leave behind."""
    if "robust-lightning" in command:
        folder = Path(next(line for line in stdout.splitlines() if line.startswith("Run folder: "))[12:])
        results = json.loads((folder / "results.json").read_text())
        if "mode=audit" in command:
            assert results["f1"] > 0.7 and (folder / "flagged.csv").exists(), results
        else:
            assert results["test/acc"] > 0.85, results
        if "mode=" not in command:
            assert "PoisonFilter flagged" in stdout and (folder / "flagged.csv").exists()
            check_report_sections(folder, tabular)
    else:
        precision, recall = map(float, re.search(r"precision ([\d.]+), recall ([\d.]+)", stdout).groups())
        assert precision > 0.7 and recall > 0.7, stdout


def check_report_sections(folder: Path, tabular: bool) -> None:
    """A training run's report: curves, the filter, its suspects (a grid for images only) and the config."""
    text = (folder / "report.html").read_text()
    page = ReportPage(text)
    expected = {"Summary", "Loss and accuracy", "Poisoned-sample filter: scores", "Most suspicious training samples"}
    assert expected | {"Configuration"} <= set(page.headings), page.headings
    assert "<th>given label</th>" in text and "<th>flagged by</th>" in text, "the suspects as a table"
    assert ("report/suspicious_samples.png" in page.images) != tabular, "a grid of images, never of feature vectors"
