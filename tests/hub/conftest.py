"""Fixtures that run a fake Hub on 127.0.0.1 and point huggingface_hub / transformers at it.

huggingface_hub reads ``HF_ENDPOINT`` once, at import, and several objects keep a copy of it. In-process
tests therefore patch every copy (with ``monkeypatch``, undone after each test):

* ``huggingface_hub.constants.ENDPOINT`` (read at call time by ``HfApi()``, ``hf_hub_download``,
  ``validate-yaml``, ...) and ``HUGGINGFACE_CO_URL_TEMPLATE`` (the resolve URL of ``hf_hub_url``);
* ``huggingface_hub.constants.HF_URL_HOSTS`` (hosts whose redirects are followed with the token);
* ``huggingface_hub.hf_api.api.endpoint``: the module-level ``HfApi`` behind ``huggingface_hub.create_repo``,
  ``upload_folder``, ... was built at import;
* ``transformers.utils.hub._hf_api``: transformers caches one ``HfApi`` (used by ``Trainer.push_to_hub`` and
  ``init_hf_repo``); it is reset to ``None`` so that it is rebuilt with the patched endpoint;
* offline mode off (``constants.HF_HUB_OFFLINE``), Xet off (``HF_HUB_DISABLE_XET``), and the download cache
  (``constants.HF_HUB_CACHE``) in the test's temporary folder.

Subprocesses get the same through the environment: ``hub_env(hub, tmp_path)`` sets ``HF_ENDPOINT``,
``HF_HOME``, ``HF_HUB_DISABLE_XET=1`` and removes ``HF_HUB_OFFLINE`` / ``TRANSFORMERS_OFFLINE`` / ``HF_TOKEN``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from fake_hub import FakeHub
from hub_test_utils import GOOD_TOKEN, point_client_at


@pytest.fixture
def fake_hub(monkeypatch, tmp_path):
    """A running fake Hub that accepts only ``GOOD_TOKEN``; the client points at it for the test."""
    with FakeHub(tokens={GOOD_TOKEN}, max_lifetime_s=120) as hub:
        point_client_at(monkeypatch, hub.url, tmp_path / "hf_cache")
        yield hub


@pytest.fixture
def closed_endpoint(monkeypatch, tmp_path):
    """An endpoint on 127.0.0.1 where nothing listens (connections are refused); the client points at it."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    endpoint = f"http://127.0.0.1:{port}"
    point_client_at(monkeypatch, endpoint, tmp_path / "hf_cache")
    return endpoint
