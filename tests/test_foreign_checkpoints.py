"""Our model classes refuse a checkpoint of another model_type instead of returning random weights."""

from __future__ import annotations

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, MambaConfig, MambaForCausalLM

from compressm_hf.modeling.lru import LRUConfig, LRUForCausalLM, LRUForSequenceClassification
from compressm_hf.modeling.mamba import CompreSSMMambaConfig, CompreSSMMambaForCausalLM


def _save_lru(folder):
    LRUForCausalLM(LRUConfig(hidden_size=8, num_hidden_layers=1, state_size=4)).save_pretrained(folder)


def _save_compressm_mamba(folder):
    config = CompreSSMMambaConfig(vocab_size=32, hidden_size=8, num_hidden_layers=2, state_sizes=[4, 2])
    CompreSSMMambaForCausalLM(config).save_pretrained(folder)


def _save_stock_mamba(folder):
    MambaForCausalLM(
        MambaConfig(vocab_size=32, hidden_size=8, num_hidden_layers=1, state_size=4)
    ).save_pretrained(folder)


def _save_gpt2(folder):
    GPT2LMHeadModel(GPT2Config(vocab_size=32, n_embd=8, n_layer=1, n_head=2, n_positions=16)).save_pretrained(
        folder
    )


@pytest.mark.parametrize(
    ("save", "found", "loader", "expected"),
    [
        (_save_lru, "compressm_lru", CompreSSMMambaForCausalLM, "compressm_mamba"),
        (_save_gpt2, "gpt2", CompreSSMMambaForCausalLM, "compressm_mamba"),
        (_save_compressm_mamba, "compressm_mamba", LRUForCausalLM, "compressm_lru"),
        (_save_stock_mamba, "mamba", LRUForCausalLM, "compressm_lru"),
        (_save_compressm_mamba, "compressm_mamba", LRUForSequenceClassification, "compressm_lru"),
    ],
)
def test_checkpoint_of_another_model_type_is_refused(tmp_path, save, found, loader, expected):
    save(tmp_path)
    with pytest.raises(ValueError, match=rf"`{found}` checkpoint.*model_type `{expected}`"):
        loader.from_pretrained(tmp_path)


def test_stock_mamba_and_own_checkpoints_still_load(tmp_path):
    _save_stock_mamba(tmp_path / "stock")
    assert CompreSSMMambaForCausalLM.from_pretrained(tmp_path / "stock").config.state_sizes == [4]
    _save_compressm_mamba(tmp_path / "ours")
    assert CompreSSMMambaForCausalLM.from_pretrained(tmp_path / "ours").config.state_sizes == [4, 2]
    _save_lru(tmp_path / "lru")
    model = LRUForCausalLM.from_pretrained(tmp_path / "lru")
    assert model.config.state_sizes == [4] and torch.isfinite(model.lm_head.weight).all()


@pytest.mark.parametrize("bad", ["16", 16])
def test_mamba_state_sizes_must_be_a_list(bad):
    with pytest.raises(ValueError, match=rf"state_sizes must be a list with one int per layer .*{bad!r}"):
        CompreSSMMambaConfig(num_hidden_layers=2, state_sizes=bad)
