"""Push a saved compressed model to the fake Hub and load it back; failures leave the folder untouched."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch
from hub_test_utils import GOOD_TOKEN, INPUT_IDS, hub_env, logits_of, make_report, tiny_model, tree_hash
from huggingface_hub import ModelCard

from compressm_hf.trainer.hub import CompreSSMHubError, push_compressed_model
from compressm_hf.trainer.model_card import write_model_card


def _saved_folder(tmp_path, kind="tiny"):
    model = tiny_model(kind)
    folder = tmp_path / f"saved-{kind}"
    model.save_pretrained(folder)
    write_model_card(folder, report=make_report(), metrics={"eval_loss": 1.5}, repo_id=f"user/{kind}")
    (folder / "checkpoint-5").mkdir()  # Trainer leftovers are not uploaded
    (folder / "checkpoint-5" / "optimizer.pt").write_bytes(b"x" * 10)
    return model, folder


@pytest.mark.parametrize("kind", ["tiny", "lru"])
def test_push_and_load_back_in_process(fake_hub, tmp_path, kind):
    from transformers import AutoModelForCausalLM

    model, folder = _saved_folder(tmp_path, kind)
    before = tree_hash(folder)
    commit = push_compressed_model(folder, f"user/{kind}", token=GOOD_TOKEN)
    assert tree_hash(folder) == before
    assert commit.oid == fake_hub.repos[f"user/{kind}"].head
    files = fake_hub.files(f"user/{kind}")
    expected = {p for p in before if not p.endswith("/") and not p.startswith("checkpoint-")}
    assert set(files) == expected
    assert any(p.endswith(".py") for p in files)  # the modeling code travels with the weights
    assert files["README.md"] == (folder / "README.md").read_bytes()

    loaded = AutoModelForCausalLM.from_pretrained(f"user/{kind}", trust_remote_code=True, token=GOOD_TOKEN)
    if kind == "tiny":  # remote code; the packaged LRU is registered in this process, so transformers uses it
        assert type(loaded).__module__.startswith(
            "transformers_modules."
        )  # (the subprocess test covers that)
    local = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)
    assert torch.equal(logits_of(loaded.eval()), logits_of(local.eval()))  # bit-identical to the saved folder
    # the in-memory model differs only by float rounding (different memory layout of the same weights)
    torch.testing.assert_close(logits_of(loaded), logits_of(model), rtol=0, atol=1e-5)
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name

    card = ModelCard.load(f"user/{kind}", token=GOOD_TOKEN)
    assert "compressed" in card.data.tags
    # pushing the same folder again is a no-op commit on the Hub side and still succeeds
    push_compressed_model(folder, f"user/{kind}", token=GOOD_TOKEN)


_PULL = textwrap.dedent(
    """
    import sys, torch
    from transformers import AutoModelForCausalLM
    assert "compressm_hf" not in sys.modules
    model = AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True).eval()
    local = AutoModelForCausalLM.from_pretrained(sys.argv[3], trust_remote_code=True).eval()
    with torch.no_grad():
        logits = model(input_ids=torch.tensor({ids})).logits
        assert torch.equal(logits, local(input_ids=torch.tensor({ids})).logits), "Hub copy != saved folder"
    torch.save(logits, sys.argv[2])
    print(type(model).__module__)
    """
).format(ids=INPUT_IDS)


def test_pull_in_fresh_process_with_hf_endpoint(fake_hub, tmp_path):
    """A user who only sets HF_ENDPOINT (read at import) gets the same logits, through trust_remote_code."""
    model, folder = _saved_folder(tmp_path, "lru")
    push_compressed_model(folder, "user/public-lru", token=GOOD_TOKEN)
    out = tmp_path / "logits.pt"
    proc = subprocess.run(
        [sys.executable, "-c", _PULL, "user/public-lru", str(out), str(folder)],
        env=hub_env(fake_hub.url, tmp_path / "home"),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().startswith("transformers_modules.")
    # bit-identical to the saved folder in that process (checked there); here, another process and code path
    torch.testing.assert_close(torch.load(out), logits_of(model), rtol=0, atol=1e-5)
    assert ("GET", "/api/models/user/public-lru") in fake_hub.requests or any(
        p.startswith("/user/public-lru/resolve/") for p in fake_hub.paths("GET")
    )


def test_private_repo_needs_token(fake_hub, tmp_path):
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import RepositoryNotFoundError

    _, folder = _saved_folder(tmp_path)
    push_compressed_model(folder, "user/secret", token=GOOD_TOKEN, private=True)
    with pytest.raises(RepositoryNotFoundError):
        hf_hub_download("user/secret", "config.json", token=False, cache_dir=tmp_path / "c1")
    assert hf_hub_download("user/secret", "config.json", token=GOOD_TOKEN, cache_dir=tmp_path / "c2")


def test_connection_refused(closed_endpoint, tmp_path):
    _, folder = _saved_folder(tmp_path)
    before = tree_hash(folder)
    with pytest.raises(CompreSSMHubError) as info:
        push_compressed_model(folder, "user/nowhere", token=GOOD_TOKEN)
    message = str(info.value)
    assert closed_endpoint in message and "HF_ENDPOINT" in message and "HF_HUB_OFFLINE" in message
    assert info.value.status_code is None
    assert isinstance(info.value, OSError)
    assert tree_hash(folder) == before


def test_offline_mode(fake_hub, monkeypatch, tmp_path):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    _, folder = _saved_folder(tmp_path)
    with pytest.raises(CompreSSMHubError, match="offline mode"):
        push_compressed_model(folder, "user/offline", token=GOOD_TOKEN)
    assert fake_hub.repos == {}


def test_bad_token(fake_hub, tmp_path):
    _, folder = _saved_folder(tmp_path)
    before = tree_hash(folder)
    with pytest.raises(CompreSSMHubError, match="token") as info:
        push_compressed_model(folder, "user/denied", token="hf_wrong")
    assert info.value.status_code == 401
    assert "hf auth login" in str(info.value)
    assert fake_hub.repos == {}
    assert tree_hash(folder) == before


def test_server_error_mid_upload(fake_hub, tmp_path):
    _, folder = _saved_folder(tmp_path)
    before = tree_hash(folder)
    fake_hub.fail("POST", r"/commit/main$", status=500)
    with pytest.raises(CompreSSMHubError, match="server error") as info:
        push_compressed_model(folder, "user/flaky", token=GOOD_TOKEN)
    assert info.value.status_code == 500
    assert fake_hub.files("user/flaky") == {}  # the repo exists, the commit was not applied
    assert any(p.endswith("/preupload/main") for p in fake_hub.paths("POST"))  # it failed mid-upload
    assert tree_hash(folder) == before
    # the next attempt goes through
    push_compressed_model(folder, "user/flaky", token=GOOD_TOKEN)
    assert "README.md" in fake_hub.files("user/flaky")


def test_missing_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a folder"):
        push_compressed_model(tmp_path / "nope", "user/x")


def test_fake_hub_is_bounded():
    import time
    import urllib.error
    import urllib.request

    from fake_hub import FakeHub

    with FakeHub(max_requests=2) as hub:
        url = hub.url + "/api/models/user/none"
        for _ in range(2):
            with pytest.raises(urllib.error.HTTPError) as info:
                urllib.request.urlopen(url, timeout=5)
            assert info.value.code == 404
        with pytest.raises(urllib.error.HTTPError) as info:
            urllib.request.urlopen(url, timeout=5)
        assert info.value.code == 503  # over budget: answers 503 and shuts itself down
        deadline = time.monotonic() + 5
        while hub._server is not None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert hub._server is None
    hub = FakeHub(max_lifetime_s=0.3).start()
    url = hub.url
    time.sleep(0.8)
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(url + "/api/whoami-v2", timeout=2)
    hub.stop()
