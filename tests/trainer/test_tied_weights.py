"""A tied ``lm_head`` is never saved, so resuming must not warn "missing keys ['lm_head.weight']";
an untied ``lm_head`` is saved, loaded and still reported when it is really missing."""

from __future__ import annotations

import logging
import os

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM
from transformers.utils import logging as hf_logging

from compressm_hf.modeling.lru import LRUConfig, LRUForCausalLM
from compressm_hf.modeling.mamba import CompreSSMMambaConfig, CompreSSMMambaForCausalLM

from .common import make_args, make_trainer

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _mamba(tied):
    config = CompreSSMMambaConfig(
        vocab_size=12,
        hidden_size=16,
        num_hidden_layers=2,
        state_size=4,
        expand=2,
        conv_kernel=2,
        tie_word_embeddings=tied,
    )
    return CompreSSMMambaForCausalLM(config)


def _lru(tied):
    return LRUForCausalLM(
        LRUConfig(vocab_size=12, hidden_size=8, num_hidden_layers=2, state_size=4, tie_word_embeddings=tied)
    )


BUILD = {"mamba": _mamba, "lru": _lru}


@pytest.fixture
def transformers_warnings(caplog):
    """transformers' own log records (its root logger does not propagate by default)."""
    hf_logging.enable_propagation()
    try:
        with caplog.at_level(logging.WARNING, logger="transformers"):
            yield caplog
    finally:
        hf_logging.disable_propagation()


@pytest.mark.parametrize("arch", list(BUILD))
def test_trainer_resume_of_tied_model_does_not_warn_missing_lm_head(arch, tmp_path, transformers_warnings):
    torch.manual_seed(0)
    args = make_args(tmp_path, max_steps=4, save_strategy="steps", save_steps=2)
    make_trainer(BUILD[arch](True), args, []).train()
    torch.manual_seed(1)
    model = BUILD[arch](True)
    transformers_warnings.clear()
    make_trainer(model, args, []).train(resume_from_checkpoint=str(tmp_path / "checkpoint-2"))
    assert "missing keys" not in transformers_warnings.text
    assert model.lm_head.weight is model.get_input_embeddings().weight


@pytest.mark.parametrize("arch", list(BUILD))
@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_load_state_dict_reports_only_really_missing_keys(arch, tied, tmp_path):
    torch.manual_seed(0)
    model = BUILD[arch](tied)
    model.save_pretrained(tmp_path)
    saved = load_file(str(tmp_path / "model.safetensors"))
    assert ("lm_head.weight" in saved) is not tied
    fresh = BUILD[arch](tied)
    result = fresh.load_state_dict(saved, strict=True)  # strict: a tied lm_head is not missing
    assert result.missing_keys == [] and result.unexpected_keys == []
    torch.testing.assert_close(fresh.lm_head.weight, model.lm_head.weight, rtol=0, atol=0)
    assert (fresh.lm_head.weight is fresh.get_input_embeddings().weight) is tied
    if not tied:  # an untied head that is absent is still reported
        del saved["lm_head.weight"]
        assert BUILD[arch](tied).load_state_dict(saved, strict=False).missing_keys == ["lm_head.weight"]


@pytest.mark.parametrize("arch", list(BUILD))
def test_untied_model_round_trips_through_from_pretrained(arch, tmp_path):
    torch.manual_seed(0)
    model = BUILD[arch](False).eval()
    with torch.no_grad():
        model.lm_head.weight.add_(1.0)  # differs from the embedding
    model.save_pretrained(tmp_path)
    again = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert again.lm_head.weight is not again.get_input_embeddings().weight
    ids = torch.randint(0, 12, (2, 5), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(again(input_ids=ids).logits, model(input_ids=ids).logits, rtol=0, atol=0)


def test_checkpoint_key_rules_are_one_file_for_every_model_folder(tmp_path):
    """``modeling/lru/checkpoint_keys.py`` links to the Mamba folder's file; saved folders get its content."""
    mamba_file = os.path.join(REPO, "modeling", "mamba", "checkpoint_keys.py")
    lru_file = os.path.join(REPO, "modeling", "lru", "checkpoint_keys.py")
    assert os.path.samefile(mamba_file, lru_file)
    _lru(True).save_pretrained(tmp_path)
    copied = tmp_path / "checkpoint_keys.py"
    assert copied.is_file() and not copied.is_symlink()
    with open(mamba_file) as source:
        assert copied.read_text() == source.read()
