"""CompreSSM Mamba-2 models: stock-Mamba2 parity, per-layer state sizes, cache, save/reload, export, Auto."""

from __future__ import annotations

import json
import os
import textwrap
from pathlib import Path

import pytest
import torch
from isolated_python import run_script  # tests/isolated_python.py (tests/ is on sys.path)
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    Mamba2Config,
    Mamba2ForCausalLM,
    MambaConfig,
    MambaForCausalLM,
)

from compressm_hf.modeling.mamba2 import (
    CompreSSMMamba2Config,
    CompreSSMMamba2ForCausalLM,
    CompreSSMMamba2Mixer,
    CompreSSMMamba2Model,
    export_to_mamba2,
)
from compressm_hf.modeling.mamba2.modeling_common import NonUniformStateSizesError

from .helpers import TINY, VOCAB, ids, logits, tiny_config, tiny_model

DECODING_CHECKS = Path(__file__).parents[1] / "decoding_checks.py"


def stock_model(n_groups=2, state_size=8, layers=2, seed=0) -> Mamba2ForCausalLM:
    torch.manual_seed(seed)
    config = Mamba2Config(**TINY, n_groups=n_groups, state_size=state_size, num_hidden_layers=layers)
    return Mamba2ForCausalLM(config).eval()


# ---------------------------------------------------------------------------------------------- config


def test_config_defaults_and_compat_fields():
    c = CompreSSMMamba2Config(**TINY, n_groups=2, num_hidden_layers=3, state_size=8)
    assert c.model_type == "compressm_mamba2"
    assert c.state_sizes == [8, 8, 8] and c.state_size == 8
    c = tiny_config((16, 8, 4))
    assert c.state_size == 16  # max, for code that reads config.state_size
    again = CompreSSMMamba2Config.from_dict(c.to_dict())
    assert again.state_sizes == [16, 8, 4] and again.state_size == 16 and again.n_groups == 2


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(num_hidden_layers=3, state_sizes=[8, 4]), "2 entries"),
        (dict(num_hidden_layers=2, state_sizes=[8, 0]), r"state_sizes\[1\] is 0"),
        (dict(num_hidden_layers=2, state_sizes=[8, 2.5]), r"state_sizes\[1\] is 2.5"),
        (dict(num_hidden_layers=2, state_sizes=8), "state_sizes must be a list"),
        (dict(num_hidden_layers=2, n_groups=3), "num_heads=4 must be a multiple of n_groups=3"),
        (dict(num_hidden_layers=2, n_groups=2, chunk_size=0), "chunk_size must be an int >= 1"),
    ],
)
def test_config_rejects_bad_values(kwargs, match):
    with pytest.raises(ValueError, match=match):
        CompreSSMMamba2Config(**{**TINY, **kwargs})


# ---------------------------------------------------------------------------------------------- parity


@pytest.mark.parametrize("n_groups", [1, 2])
def test_parameter_names_and_shapes_match_stock_mamba2(n_groups):
    ours = tiny_model((8, 8), n_groups=n_groups)
    stock = stock_model(n_groups=n_groups)
    assert {k: v.shape for k, v in ours.state_dict().items()} == {
        k: v.shape for k, v in stock.state_dict().items()
    }
    assert isinstance(ours.backbone.layers[0].mixer, CompreSSMMamba2Mixer)


def test_only_the_bc_blocks_depend_on_the_state_size():
    big, small = tiny_model((8,), n_groups=2), tiny_model((3,), n_groups=2)
    d_inner, heads, groups = 32, 4, 2
    for name, p in big.state_dict().items():
        q = small.state_dict()[name]
        if name.endswith(("in_proj.weight", "conv1d.weight", "conv1d.bias")):
            extra = (2 * d_inner + heads) if "in_proj" in name else d_inner
            assert (p.shape[0], q.shape[0]) == (extra + 2 * groups * 8, extra + 2 * groups * 3), name
        else:
            assert p.shape == q.shape, name


@pytest.mark.parametrize("n_groups", [1, 2])
def test_stock_checkpoint_loads_unchanged_with_same_logits(tmp_path, n_groups):
    stock_model(n_groups=n_groups).save_pretrained(tmp_path)
    stock = Mamba2ForCausalLM.from_pretrained(tmp_path).eval()
    ours = CompreSSMMamba2ForCausalLM.from_pretrained(tmp_path).eval()
    assert ours.config.state_sizes == [8, 8] and ours.config.n_groups == n_groups
    sd_ours, sd_stock = ours.state_dict(), stock.state_dict()
    assert sd_ours.keys() == sd_stock.keys()
    assert all(torch.equal(sd_ours[k], sd_stock[k]) for k in sd_stock)
    x = ids()
    torch.testing.assert_close(logits(ours, x), logits(stock, x), atol=1e-5, rtol=1e-5)
    mask = torch.ones_like(x)
    mask[0, :3] = 0  # left padding
    torch.testing.assert_close(
        logits(ours, x, attention_mask=mask), logits(stock, x, attention_mask=mask), atol=1e-5, rtol=1e-5
    )


def test_foreign_checkpoint_is_refused(tmp_path):
    torch.manual_seed(0)
    MambaForCausalLM(MambaConfig(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=1)).save_pretrained(
        tmp_path
    )
    with pytest.raises(ValueError, match=r"`mamba` checkpoint.*`compressm_mamba2` or `mamba2`"):
        CompreSSMMamba2ForCausalLM.from_pretrained(tmp_path)


def test_gradients_reach_every_parameter():
    model = tiny_model((8, 4)).train()
    x = ids()
    model(x, labels=x).loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert missing == []
    assert model.backbone.layers[1].mixer.A_log.grad.abs().sum() > 0


# ---------------------------------------------------------------------------------------------- cache


@pytest.mark.parametrize(("state_sizes", "n_groups"), [((8, 4, 2), 2), ((4, 4), 1)])
def test_cached_decoding_step_equals_full_forward(decoding, state_sizes, n_groups):
    # `cache` is transformers 5.24's name, `cache_params` the older one: both must reach every layer
    model = tiny_model(state_sizes, n_groups=n_groups)
    decoding.check_cached_decoding(model, ids(2, 9), cache_names=("cache", "cache_params"))


@pytest.mark.parametrize(("state_sizes", "n_groups"), [((8, 4, 2), 2), ((4, 4), 1)])
def test_cached_greedy_generate_equals_uncached_argmax(decoding, state_sizes, n_groups):
    model = tiny_model(state_sizes, n_groups=n_groups)
    prompt = ids(2, 5)
    decoding.check_greedy_generate(model, prompt, attention_mask=torch.ones_like(prompt), pad_token_id=0)


def test_cache_holds_per_layer_state_shapes(decoding):
    with torch.no_grad():
        out = tiny_model((8, 4, 2))(ids(2, 5), use_cache=True)
    cache = decoding.cache_of(out)
    shapes = [tuple(cache.get_recurrent_state(i).shape) for i in range(3)]
    assert shapes == [(2, 4, 8, 8), (2, 4, 8, 4), (2, 4, 8, 2)]  # (batch, heads, head_dim, N_i)
    conv = [tuple(cache.get_conv_state(i).shape) for i in range(3)]
    assert conv == [(2, 32 + 2 * 2 * n, 4) for n in (8, 4, 2)]  # x | B | C channels, conv_kernel


# ---------------------------------------------------------------------------------------------- save / Auto


def test_save_reload_nonuniform_with_auto_classes(tmp_path):
    model = tiny_model((8, 4, 2))
    model.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["model_type"] == "compressm_mamba2" and cfg["state_sizes"] == [8, 4, 2]
    assert cfg["auto_map"] == {
        "AutoConfig": "configuration_compressm_mamba2.CompreSSMMamba2Config",
        "AutoModelForCausalLM": "modeling_compressm_mamba2.CompreSSMMamba2ForCausalLM",
    }
    for name in ("modeling_compressm_mamba2.py", "configuration_compressm_mamba2.py", "ssd_mamba2.py"):
        assert (tmp_path / name).is_file() and not (tmp_path / name).is_symlink(), name
    for shared in ("modeling_common.py", "configuration_common.py", "ops_mamba.py"):  # real copies, not links
        assert (tmp_path / shared).is_file() and not (tmp_path / shared).is_symlink(), shared
    x = ids()
    for loader in (CompreSSMMamba2ForCausalLM, AutoModelForCausalLM):
        again = loader.from_pretrained(tmp_path).eval()
        assert type(again) is CompreSSMMamba2ForCausalLM
        assert [m.state_size for m in again.mixers()] == [8, 4, 2]
        sd, ref = again.state_dict(), model.state_dict()
        assert sd.keys() == ref.keys() and all(torch.equal(sd[k], ref[k]) for k in ref)
        torch.testing.assert_close(logits(again, x), logits(model, x), atol=0, rtol=0)
    assert isinstance(AutoConfig.from_pretrained(tmp_path), CompreSSMMamba2Config)
    assert type(AutoModel.from_config(model.config)) is CompreSSMMamba2Model


def test_model_built_at_original_size_resizes_to_load_a_smaller_checkpoint(tmp_path):
    # resume after a reduction: the checkpoint's B/C blocks are smaller than the freshly built model's
    small = tiny_model((8, 4))
    small.save_pretrained(tmp_path)
    big = tiny_model((8, 8), seed=1)
    big.load_state_dict(small.state_dict())
    assert [m.state_size for m in big.mixers()] == [8, 4] and big.config.state_sizes == [8, 4]
    x = ids()
    torch.testing.assert_close(logits(big, x), logits(small, x), atol=0, rtol=0)


def test_growing_a_layer_adds_inert_states():
    model = tiny_model((4, 4))
    x = ids()
    before = logits(model, x)
    model.backbone.layers[1].mixer.resize_(7)
    assert model.config.state_sizes == [4, 7] and model.config.state_size == 7
    torch.testing.assert_close(logits(model, x), before, atol=1e-6, rtol=1e-6)
    with pytest.raises(ValueError, match="state_size must be >= 1, got 0"):
        model.backbone.layers[0].mixer.resize_(0)


def test_stock_mamba2_refuses_nonuniform_checkpoint(tmp_path):
    tiny_model((8, 4)).save_pretrained(tmp_path)
    with pytest.raises((RuntimeError, ValueError)):
        Mamba2ForCausalLM.from_pretrained(tmp_path)


def test_trust_remote_code_load_without_compressm_hf(tmp_path):
    model_dir = tmp_path / "tiny-compressm-mamba2"
    model = tiny_model((8, 4))
    model.save_pretrained(model_dir)
    x = ids(1, 6)
    torch.save({"ids": x, "logits": logits(model, x)}, tmp_path / "expected.pt")
    script = tmp_path / "load.py"
    script.write_text(
        textwrap.dedent(
            f"""
            import importlib.util, runpy, sys
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
            checks = runpy.run_path({str(DECODING_CHECKS)!r})  # the copied code decodes through its cache
            longer = torch.randint(1, 64, (2, 9), generator=torch.Generator().manual_seed(5))
            checks["check_cached_decoding"](model, longer, cache_names=("cache", "cache_params"))
            checks["check_greedy_generate"](model, longer[:, :4], pad_token_id=0)
            print("OK", model.config.state_sizes)
            """
        )
    )
    proc = run_script(script, compressm_hf=False)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "OK [8, 4]" in proc.stdout


# ---------------------------------------------------------------------------------------------- export


@pytest.mark.parametrize("n_groups", [1, 2])
def test_export_uniform_model_to_stock_mamba2(tmp_path, n_groups):
    model = tiny_model((8, 8), n_groups=n_groups)
    for mixer in model.mixers():
        mixer.resize_(5)  # a stand-in for a compression to one size
    cfg = export_to_mamba2(model, tmp_path)
    assert cfg.state_size == 5
    on_disk = json.loads((tmp_path / "config.json").read_text())
    assert on_disk["model_type"] == "mamba2" and "auto_map" not in on_disk and "state_sizes" not in on_disk
    assert not list(Path(tmp_path).glob("*.py"))
    stock = Mamba2ForCausalLM.from_pretrained(tmp_path).eval()
    sd, ref = stock.state_dict(), model.state_dict()
    assert all(torch.equal(sd[k], ref[k]) for k in ref)
    x = ids()
    torch.testing.assert_close(logits(stock, x), logits(model, x), atol=1e-5, rtol=1e-5)


def test_export_nonuniform_refuses_or_pads_exactly(tmp_path):
    model = tiny_model((8, 4, 2))
    with pytest.raises(NonUniformStateSizesError, match=r"\[8, 4, 2\]"):
        export_to_mamba2(model, tmp_path / "refused")
    assert not (tmp_path / "refused" / "config.json").exists()
    export_to_mamba2(model, tmp_path / "padded", pad=True)
    stock = Mamba2ForCausalLM.from_pretrained(tmp_path / "padded").eval()
    assert stock.config.state_size == 8
    x = ids()
    torch.testing.assert_close(logits(stock, x), logits(model, x), atol=1e-5, rtol=1e-5)
    assert model.config.state_sizes == [8, 4, 2]  # the source model is untouched


# ---------------------------------------------------------------------------------------------- shared code


@pytest.mark.parametrize("name", ["modeling_common.py", "configuration_common.py", "ops_mamba.py"])
def test_shared_helpers_are_one_file_for_both_mamba_folders(name):
    # modeling/mamba2/<name> links to modeling/mamba/<name>: one source, a real file next to each saved model
    import compressm_hf.modeling.mamba as mamba1
    import compressm_hf.modeling.mamba2 as mamba2

    here, there = Path(mamba2.__file__).with_name(name), Path(mamba1.__file__).with_name(name)
    assert here.read_text() == there.read_text() and os.path.samefile(here, there), name
