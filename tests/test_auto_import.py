"""``import compressm_hf`` alone registers the Auto classes (fresh processes), in one place."""

from __future__ import annotations

import textwrap

import torch
from isolated_python import run_script

import compressm_hf  # noqa: F401

LOAD_WITH_PLAIN_IMPORT = """
import sys
import torch
import compressm_hf  # the only compressm_hf import
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

for folder, module in ((sys.argv[1], "configuration_compressm_mamba"), (sys.argv[2], "configuration_lru")):
    config = AutoConfig.from_pretrained(folder)  # no trust_remote_code: stdin is closed, a prompt would fail
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    for obj in (config, model, tokenizer):
        assert type(obj).__module__.startswith("compressm_hf.modeling."), type(obj).__module__
    ids = tokenizer("To be", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        torch.save(model(ids).logits, folder + "/logits.pt")
print("OK")
"""


def _save(folder, model_class, config_class, **sizes):
    from compressm_hf.modeling import CompreSSMByteTokenizer

    torch.manual_seed(0)
    model = model_class(config_class(vocab_size=256, hidden_size=8, num_hidden_layers=2, **sizes)).eval()
    model.save_pretrained(folder)
    CompreSSMByteTokenizer.for_model_config(model.config).save_pretrained(folder)
    return model


def test_import_compressm_hf_is_enough_for_auto_classes(tmp_path):
    from compressm_hf import CompreSSMMambaConfig, CompreSSMMambaForCausalLM, LRUConfig, LRUForCausalLM

    mamba = _save(tmp_path / "mamba", CompreSSMMambaForCausalLM, CompreSSMMambaConfig, state_sizes=[4, 2])
    lru = _save(tmp_path / "lru", LRUForCausalLM, LRUConfig, state_sizes=[3, 2])
    script = tmp_path / "load.py"
    script.write_text(LOAD_WITH_PLAIN_IMPORT)
    proc = run_script(script, compressm_hf=True, args=(str(tmp_path / "mamba"), str(tmp_path / "lru")))
    assert proc.returncode == 0, proc.stderr[-3000:]
    ids = torch.tensor([list(b"To be")])
    for folder, model in ((tmp_path / "mamba", mamba), (tmp_path / "lru", lru)):
        with torch.no_grad():  # same weights, another process (thread count may differ): float32 round-off only
            torch.testing.assert_close(torch.load(folder / "logits.pt"), model(ids).logits, rtol=0, atol=1e-6)


def test_core_imports_without_transformers(tmp_path):
    script = tmp_path / "core.py"
    script.write_text(
        textwrap.dedent(
            """
            import sys
            sys.modules["transformers"] = None  # transformers is not installed
            import torch
            import compressm_hf
            assert "compressm_hf.modeling" not in sys.modules
            A = torch.tensor([0.5, 0.1], dtype=torch.float64)
            B, C = torch.ones(2, 1, dtype=torch.float64), torch.ones(1, 2, dtype=torch.float64)
            hsv = compressm_hf.hankel_singular_values(A, B, C)
            print("OK", hsv.shape[-1])
            """
        )
    )
    proc = run_script(script, compressm_hf=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "OK 2" in proc.stdout


def test_one_registration_path_for_every_architecture():
    from transformers import AutoConfig
    from transformers.models.auto.tokenization_auto import TOKENIZER_MAPPING

    from compressm_hf import modeling

    modeling.register_auto_classes()  # idempotent
    for config_class, models in modeling._AUTO_MODELS.items():
        assert type(AutoConfig.for_model(config_class.model_type)) is config_class
        assert TOKENIZER_MAPPING[config_class] is modeling.CompreSSMByteTokenizer
        assert config_class._auto_class == "AutoConfig"
        for auto_class, model_class in models.items():
            assert auto_class._model_mapping[config_class] is model_class
            assert model_class._auto_class == auto_class.__name__
    assert modeling.CompreSSMByteTokenizer._auto_class == "AutoTokenizer"
