"""Shared helpers of the Hub tests: a synthetic compression report, folder hashes, tiny saved models."""

from __future__ import annotations

import hashlib
import math
import os
import sys
from pathlib import Path

import pytest
import torch

INPUT_IDS = [[1, 5, 2, 7, 3, 9, 4]]


def make_report(n_layers: int = 2, n: int = 6, steps=(10, 20), report_py_format: bool = False) -> dict:
    """A report shaped like the callback's: HSVs decay geometrically, each event cuts some states."""
    sizes = [n] * n_layers
    events = []
    for k, step in enumerate(steps):
        layers = []
        for layer in range(n_layers):
            n_before = sizes[layer]
            hsv = [math.exp(-0.7 * i - 0.2 * layer) for i in range(n_before)]
            n_after = max(1, n_before - 1 - layer) if k == 0 else n_before
            entry = {
                "n_before": n_before,
                "n_after": n_after,
                "hsv": hsv,
                "energy_kept": sum(hsv[:n_after]) / sum(hsv),
                "error_bound": 2 * sum(hsv[n_after:]),
                "rule": "tolerance",
                "selection": "largest",
            }
            entry["layer_idx" if report_py_format else "layer"] = layer
            if report_py_format:
                entry["reduced"] = n_after < n_before
            layers.append(entry)
            sizes[layer] = n_after
        event = {"step": step, "wall_time_s": 0.01, "layers": layers}
        if report_py_format:
            event.update(kind="reduction", sizes_after=list(sizes))
        events.append(event)
    if report_py_format:
        return {
            "format": "compressm-hf/compression-report",
            "version": 1,
            "config": {"tau": 0.05, "mode": "tolerance"},
            "original_sizes": [n] * n_layers,
            "final_sizes": sizes,
            "events": events,
        }
    return {
        "format_version": 1,
        "tau": 0.05,
        "mode": "tolerance",
        "original_state_sizes": [n] * n_layers,
        "final_state_sizes": sizes,
        "events": events,
        "some_future_key": {"ignored": True},
    }


def tree_hash(folder: str | os.PathLike) -> dict[str, str]:
    """``{relative path: sha256}`` of every file under ``folder`` (plus its mode), to check it is untouched."""
    folder = Path(folder)
    out = {}
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder).as_posix()
        if path.is_file():
            out[rel] = hashlib.sha256(path.read_bytes()).hexdigest() + f":{path.stat().st_mode:o}"
        else:
            out[rel + "/"] = "dir"
    return out


def tiny_model(kind: str = "tiny"):
    """A small causal LM saved with its modeling code (auto_map): the test model or the packaged LRU."""
    torch.manual_seed(0)
    if kind == "lru":
        from compressm_hf.modeling.lru import LRUConfig, LRUForCausalLM

        config = LRUConfig(vocab_size=32, hidden_size=8, num_hidden_layers=2, state_sizes=[6, 4])
        return LRUForCausalLM(config).eval()
    from modeling_tiny_ssm import TinySSMConfig, TinySSMForCausalLM

    return TinySSMForCausalLM(TinySSMConfig(state_sizes=[6, 4])).eval()


@torch.no_grad()
def logits_of(model) -> torch.Tensor:
    return model(input_ids=torch.tensor(INPUT_IDS)).logits


GOOD_TOKEN = "hf_fake_good_token"


def point_client_at(monkeypatch: pytest.MonkeyPatch, endpoint: str, cache_dir: Path) -> None:
    """Make huggingface_hub (and transformers, if imported) talk to ``endpoint`` for this test."""
    from urllib.parse import urlsplit

    import huggingface_hub.hf_api
    from huggingface_hub import constants

    endpoint = endpoint.rstrip("/")
    monkeypatch.setenv("HF_ENDPOINT", endpoint)
    monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(constants, "ENDPOINT", endpoint)
    monkeypatch.setattr(
        constants, "HUGGINGFACE_CO_URL_TEMPLATE", endpoint + "/{repo_id}/resolve/{revision}/{filename}"
    )
    monkeypatch.setattr(constants, "HF_URL_HOSTS", constants.HF_URL_HOSTS | {urlsplit(endpoint).hostname})
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache_dir))
    monkeypatch.setattr(huggingface_hub.hf_api.api, "endpoint", endpoint)
    if "transformers.utils.hub" in sys.modules:
        monkeypatch.setattr(sys.modules["transformers.utils.hub"], "_hf_api", None)


def hub_env(endpoint: str, home: Path) -> dict[str, str]:
    """The environment for a subprocess that should use ``endpoint`` with a fresh cache in ``home``."""
    env = {
        k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_TOKEN")
    }
    env.update(
        HF_ENDPOINT=endpoint,
        HF_HOME=str(home),
        HF_HUB_DISABLE_XET="1",
        HF_HUB_DISABLE_TELEMETRY="1",
        TOKENIZERS_PARALLELISM="false",
        OMP_NUM_THREADS="1",
    )
    return env


class TinyTokens(torch.utils.data.Dataset):
    """Eight 6-token sequences over a 32-token vocabulary (input_ids == labels), for short Trainer runs."""

    def __len__(self):
        return 8

    def __getitem__(self, i):
        ids = torch.tensor([(i + k) % 32 for k in range(6)])
        return {"input_ids": ids, "labels": ids}
