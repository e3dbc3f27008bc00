"""The documentation site builds in strict mode, and its API reference holds every public class."""

import importlib
import inspect
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

CONFIG = Path(__file__).parent.parent / "docs" / "mkdocs.yml"
PACKAGES = [
    "robust_lightning",
    *(
        f"robust_lightning.{name}"
        for name in (
            "callbacks", "data", "poison", "detectors", "losses", "attacks", "augment", "metrics", "integrity",
            "models", "report",
        )
    ),
]  # fmt: skip


def public_classes():
    for package in PACKAGES:
        module = importlib.import_module(package)
        for name in module.__all__:
            if inspect.isclass(getattr(module, name)):
                yield f"{package}.{name}"


def test_the_site_builds_strictly_with_every_public_class_in_the_api_reference(tmp_path):
    pytest.importorskip(
        "material", reason='the documentation packages: pip install mkdocs-material "mkdocstrings[python]" (CI does)'
    )
    pytest.importorskip("mkdocstrings_handlers.python", reason='pip install "mkdocstrings[python]"')
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    mkdocs = [sys.executable, "-m", "mkdocs", "build", "--strict", "-f", str(CONFIG), "-d", str(tmp_path)]
    result = subprocess.run(mkdocs, capture_output=True, text=True, env=env, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    anchors = set(re.findall(r'id="(robust_lightning[\w.]*)"', (tmp_path / "api" / "index.html").read_text()))
    classes = set(public_classes())
    assert len(classes) > 60
    assert classes <= anchors, f"missing from the API reference: {sorted(classes - anchors)}"
    assert (tmp_path / "own-project" / "index.html").exists() and (tmp_path / "filtering" / "index.html").exists()
