"""peft (LoRA) + CompreSSMCallback: the saved adapter reloads onto the original base in a fresh process with
identical logits; the save paths that would lose the compressed base are refused with a clear error."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from compressm_hf.modeling.lru import LRUConfig, LRUForCausalLM
from compressm_hf.modeling.lru import checkpoint_keys as lru_keys
from compressm_hf.modeling.mamba import CompreSSMMambaConfig, CompreSSMMambaForCausalLM
from compressm_hf.modeling.mamba import checkpoint_keys as mamba_keys
from compressm_hf.trainer import CompreSSMCallback
from compressm_hf.trainer.peft_io import reduced_base_tensors, save_compressed_adapter

from .common import make_args, make_trainer

VOCAB = 12  # tests/trainer/toy_ssm.CountingDataset's vocabulary


def _mamba():
    config = CompreSSMMambaConfig(
        vocab_size=VOCAB, hidden_size=16, num_hidden_layers=2, state_size=16, expand=2, conv_kernel=2
    )
    return CompreSSMMambaForCausalLM(config)


def _lru():
    return LRUForCausalLM(LRUConfig(vocab_size=VOCAB, hidden_size=8, num_hidden_layers=2, state_size=12))


# architecture -> (builder, LoRA targets, callback kwargs, its folder's checkpoint_keys module)
ARCHS = {
    "mamba": (_mamba, ["x_proj", "in_proj"], dict(tau=0.3, steps=[6], statistics_steps=3), mamba_keys),
    "lru": (_lru, ["in_proj"], dict(tau=0.1, steps=[4, 6]), lru_keys),
}


def _ids():
    return torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(0))


def _lora(base, targets):
    return get_peft_model(
        base, LoraConfig(r=2, lora_alpha=4, target_modules=targets, init_lora_weights=False)
    )


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Per architecture: the original base saved to ``base/``, LoRA + callback trained 8 steps with cuts,
    ``trainer.save_model(adapter/)``, and the in-memory model's logits."""
    root = tmp_path_factory.mktemp("peft")
    runs = {}
    for name, (build, targets, cb_kwargs, _) in ARCHS.items():
        torch.manual_seed(0)
        base = build()
        original_sizes = list(base.config.state_sizes)
        base.save_pretrained(root / name / "base")
        model = _lora(base, targets)
        trainer = make_trainer(
            model, make_args(root / name / "run", max_steps=8), [CompreSSMCallback(**cb_kwargs)]
        )
        trainer.train()
        trainer.save_model(str(root / name / "adapter"))
        model.eval()
        with torch.no_grad():
            logits = model(input_ids=_ids()).logits
        sizes = list(model.get_base_model().config.state_sizes)
        assert all(n < n0 for n, n0 in zip(sizes, original_sizes)), (name, sizes)
        runs[name] = dict(root=root / name, model=model, logits=logits, sizes=sizes, original=original_sizes)
    return runs


_RELOAD = textwrap.dedent(
    """
    import json, sys, torch
    import compressm_hf.modeling  # registers the Auto classes
    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    out = {}
    for name, folder in json.loads(sys.argv[1]).items():
        base = AutoModelForCausalLM.from_pretrained(folder + "/base")
        model = PeftModel.from_pretrained(base, folder + "/adapter").eval()
        ids = torch.randint(0, 12, (2, 9), generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            out[name] = {"logits": model(input_ids=ids).logits, "sizes": list(base.config.state_sizes)}
    torch.save(out, sys.argv[2])
    """
)


@pytest.fixture(scope="module")
def reloaded(trained, tmp_path_factory):
    """What a fresh Python process gets from ``PeftModel.from_pretrained(original base, adapter folder)``."""
    result = tmp_path_factory.mktemp("reload") / "logits.pt"
    folders = json.dumps({name: str(run["root"]) for name, run in trained.items()})
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, "-c", _RELOAD, folders, str(result)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return torch.load(result, weights_only=True)


@pytest.mark.parametrize("arch", list(ARCHS))
def test_adapter_reloads_onto_original_base_in_fresh_process(arch, trained, reloaded):
    run, got = trained[arch], reloaded[arch]
    assert got["sizes"] == run["sizes"]
    assert (got["logits"] - run["logits"]).abs().max().item() <= 1e-6


@pytest.mark.parametrize("arch", list(ARCHS))
def test_adapter_file_holds_the_reduced_base_tensors(arch, trained):
    with safe_open(str(trained[arch]["root"] / "adapter" / "adapter_model.safetensors"), "pt") as f:
        keys, metadata = set(f.keys()), f.metadata()
    assert json.loads(metadata["compressm_state_sizes"]) == trained[arch]["sizes"]
    base_keys = {k for k in keys if "lora_" not in k}
    expected = set(reduced_base_tensors(trained[arch]["model"]))
    assert base_keys == expected and expected
    if arch == "mamba":
        assert {k.rsplit("mixer.", 1)[1] for k in base_keys} == {"A_log", "x_proj.base_layer.weight"}
    else:
        names = {"nu_log", "theta_log", "gamma_log", "B_re", "B_im", "C_re", "C_im"}
        assert {k.rsplit("mixer.", 1)[1] for k in base_keys} == names


def test_uncompressed_adapter_is_plain_peft(tmp_path):
    torch.manual_seed(0)
    model = _lora(_mamba(), ["x_proj"])
    save_compressed_adapter(model, tmp_path)
    with safe_open(str(tmp_path / "adapter_model.safetensors"), "pt") as f:
        keys, metadata = list(f.keys()), f.metadata() or {}  # safe_open is not iterable
    assert keys and all("lora_" in k for k in keys) and "compressm_state_sizes" not in metadata


def test_adapter_without_reduced_tensors_is_refused_clearly(trained, tmp_path):
    """An adapter saved by plain peft (no reduced tensors) cannot go onto the original base: named error."""
    model = trained["mamba"]["model"]
    type(model).save_pretrained(model, tmp_path)  # peft's own save, bypassing the callback's hook
    base = AutoModelForCausalLM.from_pretrained(trained["mamba"]["root"] / "base")
    with pytest.raises(mamba_keys.CompressedAdapterMismatchError, match=r"x_proj\.lora_B") as err:
        PeftModel.from_pretrained(base, tmp_path)
    message = str(err.value)
    assert "[33, 2]" in message and "save_compressed_adapter" in message and "merge_and_unload" in message


@pytest.mark.parametrize("arch", list(ARCHS))
def test_saving_the_wrapped_base_is_refused_on_reload(arch, tmp_path):
    """``get_base_model().save_pretrained()`` with adapters injected used to reload with re-initialized layers."""
    build, targets, _, keys = ARCHS[arch]
    torch.manual_seed(0)
    model = _lora(build(), targets)
    model.get_base_model().save_pretrained(tmp_path)
    with pytest.raises(keys.AdapterWrappedCheckpointError) as err:
        AutoModelForCausalLM.from_pretrained(tmp_path)
    message = str(err.value)
    assert f"{targets[0]}.weight (shape [" in message and f"{targets[0]}.base_layer.weight" in message
    assert "merge_and_unload()" in message and "PeftModel.from_pretrained" in message


def test_merged_model_saves_as_a_plain_compressed_model(trained, tmp_path):
    run = trained["mamba"]
    base = AutoModelForCausalLM.from_pretrained(run["root"] / "base")
    merged = PeftModel.from_pretrained(base, run["root"] / "adapter").merge_and_unload()
    merged.save_pretrained(tmp_path)
    again = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert again.config.state_sizes == run["sizes"]
    with torch.no_grad():
        torch.testing.assert_close(again(input_ids=_ids()).logits, run["logits"], atol=1e-5, rtol=1e-5)


def test_trainer_resumes_a_compressed_adapter_checkpoint(tmp_path):
    """A fresh LoRA model at the original sizes resumes from a checkpoint written after the cut, exactly."""

    def run(resume=None):
        torch.manual_seed(0)
        model = _lora(_mamba(), ["x_proj", "in_proj"])
        args = make_args(tmp_path, max_steps=9, save_strategy="steps", save_steps=7)
        callback = CompreSSMCallback(tau=0.3, steps=[6], statistics_steps=3)
        make_trainer(model, args, [callback]).train(resume_from_checkpoint=resume)
        return model

    full = run()
    resumed = run(resume=str(tmp_path / "checkpoint-7"))
    assert resumed.get_base_model().config.state_sizes == full.get_base_model().config.state_sizes
    expected = full.state_dict()
    for key, value in resumed.state_dict().items():
        torch.testing.assert_close(value, expected[key], rtol=0, atol=0, msg=key)
