"""CompreSSM Mamba models: stock-Mamba parity, per-layer state sizes, save/reload, export, Auto classes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
import textwrap
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, MambaConfig, MambaForCausalLM

from compressm_hf.modeling.mamba import (
    CompreSSMMambaConfig,
    CompreSSMMambaForCausalLM,
    CompreSSMMambaMixer,
    CompreSSMMambaModel,
    NonUniformStateSizesError,
    export_to_mamba,
)

VOCAB = 64

# torch-only checks of cached decoding, run here and in the trust_remote_code subprocesses
DECODING_CHECKS = Path(__file__).parents[1] / "decoding_checks.py"


def tiny_config(state_sizes=(8, 4), **kw) -> CompreSSMMambaConfig:
    kw.setdefault("hidden_size", 16)
    return CompreSSMMambaConfig(
        vocab_size=VOCAB, num_hidden_layers=len(state_sizes), state_sizes=list(state_sizes), **kw
    )


def tiny_model(state_sizes=(8, 4), seed=0, **kw) -> CompreSSMMambaForCausalLM:
    torch.manual_seed(seed)
    return CompreSSMMambaForCausalLM(tiny_config(state_sizes, **kw)).eval()


def ids(batch=2, length=10, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, VOCAB, (batch, length), generator=g)


def logits(model, input_ids, **kw):
    with torch.no_grad():
        return model(input_ids, **kw).logits


# ---------------------------------------------------------------------------------------------- config


def test_config_defaults_and_compat_fields():
    c = CompreSSMMambaConfig(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=3, state_size=8)
    assert c.model_type == "compressm_mamba"
    assert c.state_sizes == [8, 8, 8] and c.state_size == 8
    c = tiny_config((16, 8, 4))
    assert c.state_size == 16  # max, for code that reads config.state_size
    again = CompreSSMMambaConfig.from_dict(c.to_dict())
    assert again.state_sizes == [16, 8, 4] and again.state_size == 16


@pytest.mark.parametrize(
    ("state_sizes", "layers", "match"),
    [
        ([8, 4], 3, "2 entries"),
        ([8, 0], 2, r"state_sizes\[1\] is 0"),
        ([8, 2.5], 2, r"state_sizes\[1\] is 2.5"),
    ],
)
def test_config_rejects_bad_state_sizes(state_sizes, layers, match):
    with pytest.raises(ValueError, match=match):
        CompreSSMMambaConfig(num_hidden_layers=layers, state_sizes=state_sizes)


# ---------------------------------------------------------------------------------------------- parity


def test_parameter_names_and_shapes_match_stock_mamba():
    ours = tiny_model((8, 8))
    stock = MambaForCausalLM(MambaConfig(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=2, state_size=8))
    assert {k: v.shape for k, v in ours.state_dict().items()} == {
        k: v.shape for k, v in stock.state_dict().items()
    }
    assert ours.lm_head.weight is ours.backbone.embeddings.weight  # tied
    assert isinstance(ours.backbone.layers[0].mixer, CompreSSMMambaMixer)


def test_stock_checkpoint_loads_unchanged_with_same_logits(tmp_path):
    torch.manual_seed(0)
    stock = MambaForCausalLM(MambaConfig(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=2, state_size=8))
    stock.save_pretrained(tmp_path)
    stock = MambaForCausalLM.from_pretrained(tmp_path).eval()
    ours = CompreSSMMambaForCausalLM.from_pretrained(tmp_path).eval()
    assert ours.config.state_sizes == [8, 8]
    sd_ours, sd_stock = ours.state_dict(), stock.state_dict()
    assert sd_ours.keys() == sd_stock.keys()
    assert all(torch.equal(sd_ours[k], sd_stock[k]) for k in sd_stock)
    x = ids()
    torch.testing.assert_close(logits(ours, x), logits(stock, x), atol=1e-5, rtol=1e-5)
    # with left padding (attention mask) too
    mask = torch.ones_like(x)
    mask[0, :3] = 0
    torch.testing.assert_close(
        logits(ours, x, attention_mask=mask), logits(stock, x, attention_mask=mask), atol=1e-5, rtol=1e-5
    )


@pytest.mark.parametrize("state_sizes", [(8, 4, 2), (4, 4)])
def test_cached_greedy_generate_equals_uncached_argmax(decoding, state_sizes):
    model = tiny_model(state_sizes)
    prompt = ids(2, 5)
    decoding.check_greedy_generate(model, prompt, attention_mask=torch.ones_like(prompt), pad_token_id=0)


@pytest.mark.parametrize("state_sizes", [(8, 4, 2), (4, 4)])
def test_cached_decoding_step_equals_full_forward(decoding, state_sizes):
    # `cache` is transformers 5.24's name, `cache_params` the older one: both must reach every layer
    decoding.check_cached_decoding(tiny_model(state_sizes), ids(2, 9), cache_names=("cache", "cache_params"))


def test_cache_holds_per_layer_state_shapes(decoding):
    model = tiny_model((8, 4, 2))
    with torch.no_grad():
        out = model(ids(2, 5), use_cache=True)
    cache = decoding.cache_of(out)
    shapes = [tuple(cache.get_recurrent_state(i).shape) for i in range(3)]
    assert shapes == [(2, 32, 8), (2, 32, 4), (2, 32, 2)]


def test_private_transformers_helpers_have_local_equivalents():
    # the modeling file falls back to ops_mamba when transformers drops its private Mamba helpers
    from transformers.models.mamba import modeling_mamba as stock

    from compressm_hf.modeling.mamba import ops_mamba as ours

    g = torch.Generator().manual_seed(0)
    x, w, b = torch.randn(2, 6, 9, generator=g), torch.randn(6, 4, generator=g), torch.randn(6, generator=g)
    for act in (None, "silu"):
        torch.testing.assert_close(ours.causal_conv1d_fn(x, w, b, act), stock.causal_conv1d_fn(x, w, b, act))
        s1 = torch.randn(2, 6, 3, generator=g)
        s2 = s1.clone()
        step = torch.randn(2, 6, 1, generator=g)
        torch.testing.assert_close(
            ours.causal_conv1d_update(step, s1, w, b, act), stock.causal_conv1d_update(step, s2, w, b, act)
        )
        torch.testing.assert_close(s1, s2)
    mask = torch.tensor([[0, 1, 1], [1, 1, 1]])
    h = torch.randn(2, 3, 5, generator=g)
    torch.testing.assert_close(
        ours.apply_mask_to_padding_states(h, mask), stock.apply_mask_to_padding_states(h, mask)
    )
    d, n = 6, 4
    state = torch.randn(2, d, n, generator=g)
    args = (
        torch.randn(2, d, generator=g),  # hidden_states
        torch.randn(2, d, generator=g),  # dt
        -torch.rand(d, n, generator=g),  # A
        torch.randn(2, n, generator=g),  # B
        torch.randn(2, n, generator=g),  # C
    )
    kw = dict(D=torch.randn(d, generator=g), dt_bias=torch.randn(d, generator=g), dt_softplus=True)
    kw["z"] = torch.randn(2, d, generator=g)
    mine, theirs = state.clone(), state.clone()
    torch.testing.assert_close(
        ours.mamba_selective_state_update(mine, *args, **kw),
        stock.mamba_selective_state_update(theirs, *args, **kw),
    )
    torch.testing.assert_close(mine, theirs)


def test_falls_back_cleanly_when_transformers_drops_its_private_helpers(tmp_path):
    script = textwrap.dedent(
        f"""
        import runpy
        import torch
        import transformers.models.mamba.modeling_mamba as stock
        for name in ("apply_mask_to_padding_states", "causal_conv1d_fn", "causal_conv1d_update",
                     "mamba_selective_state_update"):
            delattr(stock, name)  # as if a later transformers moved them
        from compressm_hf.modeling.mamba import modeling_compressm_mamba as ours, ops_mamba
        assert ours.causal_conv1d_update is ops_mamba.causal_conv1d_update
        assert ours.mamba_selective_state_update is ops_mamba.mamba_selective_state_update
        torch.manual_seed(0)
        config = ours.CompreSSMMambaConfig(vocab_size=64, hidden_size=16, num_hidden_layers=2, state_sizes=[8, 4])
        model = ours.CompreSSMMambaForCausalLM(config).eval()
        checks = runpy.run_path({str(DECODING_CHECKS)!r})
        ids = torch.randint(1, 64, (2, 9), generator=torch.Generator().manual_seed(1))
        checks["check_cached_decoding"](model, ids, cache_names=("cache", "cache_params"))
        checks["check_greedy_generate"](model, ids[:, :4], pad_token_id=0)
        print("OK")
        """
    )
    proc = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "OK" in proc.stdout


def test_gradients_reach_every_parameter():
    model = tiny_model((8, 4)).train()
    x = ids()
    model(x, labels=x).loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert missing == []
    assert model.backbone.layers[1].mixer.A_log.grad.abs().sum() > 0


def test_gradient_checkpointing_matches():
    model = tiny_model((8, 4)).train()
    x = ids()
    model(x, labels=x).loss.backward()
    ref = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    model.activation_checkpointing_enable()
    model(x, labels=x).loss.backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, ref[n], atol=1e-6, rtol=1e-5)


# ---------------------------------------------------------------------------------------------- save / Auto


def test_save_reload_nonuniform_with_auto_classes(tmp_path):
    model = tiny_model((8, 4, 2))
    model.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["model_type"] == "compressm_mamba" and cfg["state_sizes"] == [8, 4, 2]
    assert cfg["auto_map"] == {
        "AutoConfig": "configuration_compressm_mamba.CompreSSMMambaConfig",
        "AutoModelForCausalLM": "modeling_compressm_mamba.CompreSSMMambaForCausalLM",
    }
    assert (tmp_path / "modeling_compressm_mamba.py").exists()
    assert (tmp_path / "configuration_compressm_mamba.py").exists()
    x = ids()
    for loader in (CompreSSMMambaForCausalLM, AutoModelForCausalLM):
        again = loader.from_pretrained(tmp_path).eval()
        assert type(again) is CompreSSMMambaForCausalLM
        assert [m.state_size for m in again.mixers()] == [8, 4, 2]
        torch.testing.assert_close(logits(again, x), logits(model, x), atol=0, rtol=0)
    assert isinstance(AutoConfig.from_pretrained(tmp_path), CompreSSMMambaConfig)
    assert type(AutoModel.from_config(model.config)) is CompreSSMMambaModel


def test_stock_mamba_refuses_nonuniform_checkpoint(tmp_path):
    tiny_model((8, 4)).save_pretrained(tmp_path)
    with pytest.raises((RuntimeError, ValueError)):
        MambaForCausalLM.from_pretrained(tmp_path)


def _python_without_compressm_hf() -> list[str]:
    """A command prefix for a Python that can import torch/transformers but not compressm_hf.

    ``-I`` ignores PYTHONPATH, the user site and the cwd; ``-S`` skips ``site``, so the ``.pth`` file
    of the editable install (which puts compressm_hf's import hook on ``sys.meta_path``) never runs.
    The venv's site-packages is then added as a plain path entry (no ``.pth`` processing).
    """
    purelib = sysconfig.get_paths()["purelib"]
    boot = f"import sys; sys.path.append({purelib!r}); exec(open(sys.argv[1]).read())"
    return [sys.executable, "-I", "-S", "-c", boot]


def test_trust_remote_code_load_without_compressm_hf(tmp_path):
    model_dir = tmp_path / "tiny-compressm-mamba"
    model = tiny_model((8, 4))
    model.save_pretrained(model_dir)
    x = ids(1, 6)
    expected = logits(model, x)
    torch.save({"ids": x, "logits": expected}, tmp_path / "expected.pt")
    script = tmp_path / "load.py"
    script.write_text(
        textwrap.dedent(
            f"""
            import importlib.util, sys
            assert importlib.util.find_spec("compressm_hf") is None, "compressm_hf is importable"
            import torch
            from transformers import AutoModelForCausalLM
            model_dir = {str(model_dir)!r}
            try:
                AutoModelForCausalLM.from_pretrained(model_dir)
            except ValueError as err:
                assert "trust_remote_code" in str(err), err
            else:
                raise AssertionError("loaded custom code without trust_remote_code")
            model = AutoModelForCausalLM.from_pretrained(model_dir, trust_remote_code=True).eval()
            assert type(model).__module__.startswith("transformers_modules."), type(model).__module__
            assert "compressm_hf" not in sys.modules
            ref = torch.load({str(tmp_path / "expected.pt")!r})
            with torch.no_grad():
                out = model(ref["ids"]).logits
            torch.testing.assert_close(out, ref["logits"], atol=1e-6, rtol=1e-6)
            gen = model.generate(ref["ids"], attention_mask=torch.ones_like(ref["ids"]), max_new_tokens=3,
                                 do_sample=False, pad_token_id=0)
            assert gen.shape == (1, 9)
            import runpy  # the copied code must decode through its cache exactly
            checks = runpy.run_path({str(DECODING_CHECKS)!r})
            longer = torch.randint(1, 64, (2, 9), generator=torch.Generator().manual_seed(5))
            checks["check_cached_decoding"](model, longer, cache_names=("cache", "cache_params"))
            checks["check_greedy_generate"](model, longer[:, :4], pad_token_id=0)
            print("OK", model.config.state_sizes)
            """
        )
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    env.update(HF_HOME=str(tmp_path / "hf_home"), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    proc = subprocess.run(
        [*_python_without_compressm_hf(), str(script)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "OK [8, 4]" in proc.stdout


# ---------------------------------------------------------------------------------------------- export


def _shrink_to(model, sizes):
    """Reduce each layer to the leading ``sizes[i]`` states (a stand-in for a real compression)."""
    for mixer, k in zip(model.mixers(), sizes):
        if k < mixer.state_size:
            mixer.resize_(k)
    return model


def test_export_uniform_model_to_stock_mamba(tmp_path):
    model = _shrink_to(tiny_model((8, 8)), [4, 4])
    assert model.config.state_sizes == [4, 4]
    cfg = export_to_mamba(model, tmp_path)
    assert cfg.state_size == 4
    on_disk = json.loads((tmp_path / "config.json").read_text())
    assert on_disk["model_type"] == "mamba" and "auto_map" not in on_disk and "state_sizes" not in on_disk
    assert not list(Path(tmp_path).glob("*.py"))
    stock = MambaForCausalLM.from_pretrained(tmp_path).eval()
    x = ids()
    torch.testing.assert_close(logits(stock, x), logits(model, x), atol=1e-6, rtol=1e-6)


def test_export_nonuniform_refuses_or_pads_exactly(tmp_path):
    model = tiny_model((8, 4, 2))
    with pytest.raises(NonUniformStateSizesError, match=r"\[8, 4, 2\]"):
        export_to_mamba(model, tmp_path / "refused")
    assert not (tmp_path / "refused" / "config.json").exists()
    export_to_mamba(model, tmp_path / "padded", pad=True)
    stock = MambaForCausalLM.from_pretrained(tmp_path / "padded").eval()
    assert stock.config.state_size == 8
    x = ids()
    torch.testing.assert_close(logits(stock, x), logits(model, x), atol=1e-5, rtol=1e-5)
    assert model.config.state_sizes == [8, 4, 2]  # the source model is untouched
