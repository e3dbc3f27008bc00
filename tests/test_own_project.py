"""docs/own-project.md as a user follows it: its files written into an empty folder, its commands run there."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

PAGE = Path(__file__).parent.parent / "docs" / "own-project.md"
BLOCK = re.compile(r'```(\w+)(?: title="([^"]+)")?\n(.*?)```', re.DOTALL)


def page():
    """The files the page asks the user to write, and its commands in order."""
    files, commands = {}, []
    for language, title, body in BLOCK.findall(PAGE.read_text()):
        if title:
            files[title] = body
        elif language == "bash":
            commands += [line for line in body.splitlines() if line.strip()]
    return files, commands


FILES, COMMANDS = page()
# Two processes, or 40 epochs of the recipes' filter on images: minutes on 2 cores.
SLOW = ("trainer=ddp_cpu", "filter=default")


def test_the_page_has_both_projects_in_python_on_the_command_line_and_under_ddp():
    assert {"mytab/data.py", "mytab/model.py", "train_tabular.py", "myimg/project.py"} <= set(FILES)
    assert any("python train_tabular.py" in c for c in COMMANDS)
    assert sum("--config-dir myconf" in c for c in COMMANDS) == 3
    assert any("trainer=ddp_cpu" in c for c in COMMANDS)


@pytest.mark.parametrize(
    "command", [pytest.param(c, marks=pytest.mark.slow) if any(s in c for s in SLOW) else c for c in COMMANDS]
)
def test_each_command_of_the_page_runs_from_an_empty_folder(command, tmp_path):
    for name, text in FILES.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    result = subprocess.run(
        ["bash", "-c", command], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900, check=False
    )
    assert result.returncode == 0, result.stderr[-3000:]
    if "robust-lightning" in command:
        folder = Path(next(line for line in result.stdout.splitlines() if line.startswith("Run folder: "))[12:])
        assert json.loads((folder / "results.json").read_text())["test/acc"] > 0.85
        assert "PoisonFilter flagged" in result.stdout and (folder / "flagged.csv").exists()
    else:
        precision, recall = map(float, re.search(r"precision ([\d.]+), recall ([\d.]+)", result.stdout).groups())
        assert precision > 0.7 and recall > 0.7, result.stdout
