"""Helpers shared by the CLI tests: run a CLI main in-process, expect a usage error, check a saved folder."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import pytest


def run_main(main, argv):
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = main(argv)
    return rc, buf.getvalue()


def usage_error(main, argv, capsys) -> str:
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    return capsys.readouterr().err


def assert_model_folder(folder: Path, *, shrank: bool = True) -> list[int]:
    for name in (
        "config.json",
        "model.safetensors",
        "compression_report.json",
        "hsv_spectra.png",
        "state_sizes.png",
        "README.md",
    ):
        assert (folder / name).is_file(), f"{name} missing from {sorted(p.name for p in folder.iterdir())}"
    config = json.loads((folder / "config.json").read_text())
    report = json.loads((folder / "compression_report.json").read_text())
    assert config["auto_map"]["AutoModelForCausalLM"]
    assert config["state_sizes"] == report["final_sizes"]
    if shrank:
        assert sum(report["final_sizes"]) < sum(report["original_sizes"])
    return config["state_sizes"]


def load_remote(folder: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(folder), trust_remote_code=True).eval()
