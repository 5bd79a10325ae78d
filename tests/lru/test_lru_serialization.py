"""save_pretrained / from_pretrained of compressed LRU models: Auto classes and trust_remote_code."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import torch
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoModelForSequenceClassification

import compressm_hf.modeling  # noqa: F401  (registers the Auto classes)
from compressm_hf.modeling.lru import LRUConfig, LRUForCausalLM, LRUForSequenceClassification, LRUModel

# torch-only checks of cached decoding, run here and in the trust_remote_code subprocesses
DECODING_CHECKS = Path(__file__).parents[1] / "decoding_checks.py"


def _compressed_lm():
    torch.manual_seed(0)
    model = LRUForCausalLM(
        LRUConfig(hidden_size=12, num_hidden_layers=3, state_size=6, scan_chunk_size=4)
    ).eval()
    model.model.layers[0].mixer.reduce_(SimpleNamespace(rank=2, keep=torch.tensor([0, 3]), diagonal=None))
    model.model.layers[2].mixer.reduce_(
        SimpleNamespace(rank=4, keep=torch.tensor([1, 2, 3, 5]), diagonal=None)
    )
    model.config.compression = {"events": [{"step": 10, "state_sizes": [2, 6, 4]}]}
    return model


def test_save_and_auto_reload_compressed_model(tmp_path):
    model = _compressed_lm()
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["model_type"] == "compressm_lru"
    assert saved["state_sizes"] == [2, 6, 4]
    assert saved["auto_map"] == {
        "AutoConfig": "configuration_lru.LRUConfig",
        "AutoModelForCausalLM": "modeling_lru.LRUForCausalLM",
    }
    for name in ("configuration_lru.py", "modeling_lru.py", "scan_lru.py"):
        assert (tmp_path / name).is_file()

    assert isinstance(AutoConfig.from_pretrained(tmp_path), LRUConfig)
    again = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(again) is LRUForCausalLM
    assert [layer.mixer.state_size for layer in again.model.layers] == [2, 6, 4]
    assert again.config.compression == model.config.compression
    ids = torch.randint(0, 256, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(again(ids).logits, model(ids).logits, rtol=0, atol=0)
    assert again.lm_head.weight is again.model.embeddings.weight
    # the bare model and other heads load from the same folder
    base = AutoModel.from_pretrained(tmp_path)
    assert type(base) is LRUModel and base.layers[2].mixer.state_size == 4


def test_sequence_classifier_auto_round_trip(tmp_path):
    torch.manual_seed(0)
    model = LRUForSequenceClassification(
        LRUConfig(hidden_size=8, num_hidden_layers=1, state_size=4, input_size=2, num_labels=3)
    )
    model.model.layers[0].mixer.reduce_(SimpleNamespace(rank=3, keep=torch.tensor([0, 1, 3]), diagonal=None))
    model.save_pretrained(tmp_path)
    again = AutoModelForSequenceClassification.from_pretrained(tmp_path)
    assert type(again) is LRUForSequenceClassification
    x = torch.randn(2, 5, 2)
    with torch.no_grad():
        torch.testing.assert_close(again.eval()(inputs_embeds=x).logits, model.eval()(inputs_embeds=x).logits)


_REMOTE_SCRIPT = textwrap.dedent(
    """
    import importlib.abc, sys

    class _Hide(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == "compressm_hf" or name.startswith("compressm_hf."):
                raise ModuleNotFoundError(f"No module named {name!r} (hidden by the test)")
            return None

    sys.meta_path.insert(0, _Hide())
    try:
        import compressm_hf  # noqa: F401
    except ImportError:
        pass
    else:
        raise SystemExit("compressm_hf should not be importable here")

    import torch
    from transformers import AutoModelForCausalLM

    folder, ids_path, out_path, checks_path = sys.argv[1:5]
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
    assert "transformers_modules" in type(model).__module__, type(model).__module__
    system = model.model.layers[0].mixer.lti_system()
    assert type(system).__name__ == "_LocalLTISystem" and system.A.shape == (2,)
    ids = torch.load(ids_path)
    with torch.no_grad():
        logits = model(ids).logits
    generated = model.generate(ids, max_new_tokens=3, do_sample=False)
    import runpy

    checks = runpy.run_path(checks_path)  # the copied code must decode through its cache exactly
    checks["check_cached_decoding"](model, ids, cache_names=("cache", "past_key_values"))
    checks["check_greedy_generate"](model, ids)
    torch.save({"logits": logits, "generated": generated, "sizes": model.config.state_sizes}, out_path)
    """
)


def test_trust_remote_code_loads_without_compressm_hf(tmp_path):
    model = _compressed_lm()
    folder = tmp_path / "lru-compressed"
    model.save_pretrained(folder)
    ids = torch.randint(0, 256, (2, 6))
    torch.save(ids, tmp_path / "ids.pt")
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_MODULES_CACHE": str(tmp_path / "modules"),
        "PYTHONPATH": "",
    }
    result = subprocess.run(
        [
            sys.executable,
            "-c",
            _REMOTE_SCRIPT,
            str(folder),
            str(tmp_path / "ids.pt"),
            str(tmp_path / "out.pt"),
            str(DECODING_CHECKS),
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    remote = torch.load(tmp_path / "out.pt")
    assert remote["sizes"] == [2, 6, 4]
    with torch.no_grad():
        torch.testing.assert_close(remote["logits"], model(ids).logits, rtol=0, atol=0)
    assert torch.equal(remote["generated"], model.generate(ids, max_new_tokens=3, do_sample=False))
