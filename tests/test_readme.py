"""The README's Python example runs as written, and its quickstart is what CI runs."""

import re
from pathlib import Path

import torch

README = Path(__file__).parent.parent / "README.md"


def test_the_python_example_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # Lightning writes checkpoints/ into the working folder
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.DOTALL)
    assert blocks
    namespace: dict = {}
    for block in blocks:
        exec(compile(block, str(README), "exec"), namespace)  # noqa: S102 (the README's own code is under test)
    assert len(namespace["metrics"].last("test")["recall"]) == 10
    assert int(namespace["datamodule"].poison_mask.sum()) == 206
    assert isinstance(namespace["model"].criterion, torch.nn.CrossEntropyLoss)


def test_ci_runs_the_readme_commands():
    bash = re.findall(r"```bash\n(.*?)```", README.read_text(), flags=re.DOTALL)
    ci = (README.parent / ".ci" / "run").read_text()
    for command in (bash[0].strip(), bash[1].strip()):
        assert command in ci
