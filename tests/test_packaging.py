"""pyproject.toml lists every importable package, so `pip install -e .` prints no "Package would be ignored"
banner (setuptools warns for each folder of .py files inside a listed package that is not listed itself)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")

ROOT = Path(__file__).resolve().parents[1]


def _setuptools_config() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text("utf-8"))


def _importable_packages(name: str, folder: Path) -> set[str]:
    """Every folder under ``folder`` (itself included) that holds a .py file, as a dotted package name."""
    found = set()
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = [d for d in dirnames if d != "__pycache__" and not d.startswith(".")]
        if any(f.endswith(".py") for f in filenames):
            rel = Path(dirpath).relative_to(folder)
            found.add(".".join([name, *rel.parts]))
    return found


def test_every_importable_package_is_listed():
    setuptools = _setuptools_config()["tool"]["setuptools"]
    listed = set(setuptools["packages"])
    importable = set()
    for name, folder in setuptools["package-dir"].items():  # modeling/ installs as compressm_hf.modeling, ...
        importable |= _importable_packages(name, ROOT / folder)
    missing = sorted(importable - listed)
    assert not missing, f"add {missing} to [tool.setuptools] packages in pyproject.toml"
    assert {"compressm_hf.metrics.accuracy", "compressm_hf.metrics.perplexity"} <= listed


def test_license_is_an_spdx_expression_without_the_deprecated_classifier():
    project = _setuptools_config()["project"]
    assert project["license"] == "Apache-2.0"
    assert not [c for c in project["classifiers"] if c.startswith("License ::")]
