"""Fixtures shared by every test folder."""

from __future__ import annotations

import runpy
from pathlib import Path
from types import SimpleNamespace

import pytest

DECODING_CHECKS = Path(__file__).with_name("decoding_checks.py")


@pytest.fixture(scope="session")
def decoding() -> SimpleNamespace:
    """``tests/decoding_checks.py`` (cached decoding vs the full forward), loaded by path as the
    ``trust_remote_code`` subprocesses load it."""
    return SimpleNamespace(**runpy.run_path(str(DECODING_CHECKS)))
