"""CompreSSMCallback with the real LRU models (compressm_hf.modeling.lru)."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from compressm_hf.trainer import CompreSSMCallback, read_report
from compressm_hf.trainer.surgery import base_optimizer

from .common import Probe, make_args, make_trainer

lru = pytest.importorskip("compressm_hf.modeling.lru")

STEPS = [2, 4]
LRU_SSM_SUFFIXES = ("nu_log", "theta_log", "gamma_log", "B_re", "B_im", "C_re", "C_im")


def _lru(seed=0):
    torch.manual_seed(seed)
    config = lru.LRUConfig(vocab_size=12, hidden_size=8, num_hidden_layers=2, state_size=12)
    return lru.LRUForCausalLM(config)


def _ssm(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if n.endswith(LRU_SSM_SUFFIXES)}


def test_lru_train_save_load_resume(tmp_path):
    model = _lru()
    cb = CompreSSMCallback(tau=0.1, steps=STEPS)
    probe = Probe(snapshot_steps=[4])
    args = make_args(tmp_path / "a", max_steps=8, save_strategy="steps", save_steps=3, logging_steps=2)
    trainer = make_trainer(model, args, [cb, probe])
    trainer.train()

    sizes = model.config.state_sizes
    layers = [m for m in model.modules() if isinstance(m, lru.LRUMixer)]
    assert sizes == [m.state_size for m in layers] == cb.history[-1]["sizes_after"]
    assert all(n < 12 for n in sizes)
    assert [e["step"] for e in model.config.compression["events"]] == STEPS
    opt = base_optimizer(trainer.optimizer)
    assert {id(p) for g in opt.param_groups for p in g["params"]} == {id(p) for p in model.parameters()}
    after = {k: v for k, v in probe.snapshots[4]["model"].items() if k.endswith(LRU_SSM_SUFFIXES)}
    final = _ssm(model)
    assert final and final.keys() == after.keys()
    for name, value in final.items():
        assert (value - after[name]).abs().max() > 0, name
    assert read_report(tmp_path / "a" / "checkpoint-3")["final_sizes"] == cb.history[0]["sizes_after"]
    assert json.loads((tmp_path / "a" / "checkpoint-6" / "config.json").read_text())["state_sizes"] == sizes

    # save_pretrained -> from_pretrained / AutoModelForCausalLM: identical outputs
    out = tmp_path / "final"
    trainer.save_model(str(out))
    ids = torch.randint(0, 12, (2, 9), generator=torch.Generator().manual_seed(0))
    model.eval()
    with torch.no_grad():
        ref = model(ids).logits
    for loaded in (
        lru.LRUForCausalLM.from_pretrained(out),
        AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True),
    ):
        loaded.eval()
        assert loaded.config.state_sizes == sizes
        assert loaded.config.compression == model.config.compression
        with torch.no_grad():
            torch.testing.assert_close(loaded(ids).logits, ref, rtol=0, atol=0)

    # resume from a checkpoint written between the cuts, with a model built at its original size
    resumed = _lru()
    cb_b = CompreSSMCallback(tau=0.1, steps=STEPS)
    args_b = make_args(tmp_path / "b", max_steps=8, save_strategy="no", logging_steps=2)
    make_trainer(resumed, args_b, [cb_b]).train(resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-3"))
    assert resumed.config.state_sizes == sizes
    assert [e["step"] for e in cb_b.history] == STEPS
    ref_sd = trainer.model.state_dict()
    for k, v in resumed.state_dict().items():
        torch.testing.assert_close(v, ref_sd[k], rtol=1e-5, atol=1e-6, msg=k)
