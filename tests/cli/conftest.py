"""Shared fixtures of the CLI tests: a tiny text file and tiny trained model folders (built once per session)."""

from __future__ import annotations

import random

import pytest

TINY_MODEL = [
    "--hidden_size", "16", "--num_hidden_layers", "2", "--state_size", "8",
    "--block_size", "32", "--per_device_train_batch_size", "4", "--per_device_eval_batch_size", "8",
    "--max_eval_blocks", "4", "--max_steps", "8", "--logging_steps", "2",
    "--tau", "0.3", "--steps", "2", "4", "--statistics_steps", "2",
]  # fmt: skip


def _text(n_sentences: int = 600, seed: int = 0) -> str:
    rng = random.Random(seed)
    sentence = "the quick brown fox jumps over a lazy dog while seven wise kings sing of summer rain"
    words = sentence.split(maxsplit=-1)
    return "\n".join(
        " ".join(rng.choice(words) for _ in range(rng.randint(4, 12))) + "." for _ in range(n_sentences)
    )


@pytest.fixture(scope="session")
def tiny_text(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "tiny.txt"
    path.write_text(_text(), "utf-8")
    return path


@pytest.fixture(scope="session")
def trained_mamba(tmp_path_factory, tiny_text):
    """``compressm-train`` (in-process) on the tiny text file; returns ``(output_dir, captured stdout)``."""
    import contextlib
    import io

    from compressm_hf.cli.train import main

    out = tmp_path_factory.mktemp("runs") / "tiny-mamba"
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = main(
            ["--output_dir", str(out), "--dataset", str(tiny_text), "--disable_tqdm", "true", *TINY_MODEL]
        )
    assert rc == 0
    return out, buf.getvalue()


@pytest.fixture(scope="session")
def stock_mamba(tmp_path_factory):
    """A random tiny stock transformers ``MambaForCausalLM`` saved locally (never from the Hub)."""
    import torch
    from transformers import MambaConfig, MambaForCausalLM

    torch.manual_seed(0)
    model = MambaForCausalLM(MambaConfig(vocab_size=256, hidden_size=16, num_hidden_layers=2, state_size=8))
    path = tmp_path_factory.mktemp("stock") / "stock-mamba"
    model.save_pretrained(path)
    return path


@pytest.fixture
def fake_hub(monkeypatch, tmp_path):
    """The loopback fake Hub of ``tests/hub`` (accepts only ``GOOD_TOKEN``), with the client pointed at it.

    ``HF_TOKEN`` is restored after the test: ``compressm-train --hub_token`` moves the token there.
    """
    import sys
    from pathlib import Path

    hub_dir = str(Path(__file__).resolve().parents[1] / "hub")
    if hub_dir not in sys.path:
        sys.path.insert(0, hub_dir)
    from fake_hub import FakeHub
    from hub_test_utils import GOOD_TOKEN, point_client_at

    monkeypatch.setenv("HF_TOKEN", "placeholder")  # recorded, so the teardown restores the original state
    with FakeHub(tokens={GOOD_TOKEN}, max_lifetime_s=120) as hub:
        point_client_at(monkeypatch, hub.url, tmp_path / "hf_cache")
        hub.token = GOOD_TOKEN
        yield hub
