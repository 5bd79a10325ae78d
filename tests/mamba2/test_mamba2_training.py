"""CompreSSMCallback on Mamba-2, unchanged: statistics window, per-group cuts, optimizer state, report."""

from __future__ import annotations

import torch

# tests/ is on sys.path (the rootdir of the test packages), as pytest imports tests/trainer/
from trainer.common import make_args, make_trainer

from compressm_hf.modeling.mamba2 import CompreSSMMamba2ForCausalLM, CompreSSMMamba2Mixer
from compressm_hf.trainer import CompreSSMCallback, read_report
from compressm_hf.trainer.surgery import base_optimizer

from .helpers import tiny_config


def test_callback_compresses_mamba2_during_training(tmp_path):
    torch.manual_seed(0)
    model = CompreSSMMamba2ForCausalLM(tiny_config((16, 16), n_groups=2, vocab_size=12))
    mixers = [m for m in model.modules() if isinstance(m, CompreSSMMamba2Mixer)]
    cb = CompreSSMCallback(tau=0.3, steps=[4], statistics_steps=2)
    trainer = make_trainer(model, make_args(tmp_path, max_steps=7), [cb])
    before = {n: p.detach().clone() for n, p in model.named_parameters() if "in_proj" in n or "conv1d" in n}
    trainer.train()

    sizes = model.config.state_sizes
    assert sizes == [m.state_size for m in mixers] and all(n < 16 for n in sizes), sizes
    layers = read_report(tmp_path)["events"][0]["layers"]
    for layer in layers:  # both energies are in the report: what the HSV rule promised, what the subset holds
        extra = layer["extra"]
        assert 0 < extra["energy_promised"] <= 1 + 1e-5 and 0 < layer["energy_kept"] <= 1 + 1e-5
        assert extra["energy_kept_subset"] == layer["energy_kept"] and extra["num_groups"] == 2
    # the optimizer holds exactly the live parameters, with moments of the new shapes, and they still train
    opt = base_optimizer(trainer.optimizer)
    assert {id(p) for g in opt.param_groups for p in g["params"]} == {id(p) for p in model.parameters()}
    assert opt.state[mixers[0].in_proj.weight]["exp_avg"].shape == mixers[0].in_proj.weight.shape
    for name, p in model.named_parameters():
        if name in before:
            assert p.shape != before[name].shape or not torch.equal(p.detach(), before[name]), name


def test_resume_from_compressed_checkpoint_at_original_size_matches_uninterrupted_run(tmp_path):
    def run(out, resume=None):
        torch.manual_seed(0)
        model = CompreSSMMamba2ForCausalLM(tiny_config((12, 12), n_groups=2, vocab_size=12))
        cb = CompreSSMCallback(tau=0.3, steps=[3], statistics_steps=2)
        args = make_args(out, max_steps=6, save_strategy="steps", save_steps=4)
        make_trainer(model, args, [cb]).train(resume_from_checkpoint=resume)
        return model

    uninterrupted = run(tmp_path / "a")
    assert uninterrupted.config.state_sizes != [12, 12]
    # a model built at its ORIGINAL size resumes from the checkpoint written after the cut
    resumed = run(tmp_path / "b", resume=str(tmp_path / "a" / "checkpoint-4"))
    assert resumed.config.state_sizes == uninterrupted.config.state_sizes
    sd_a, sd_b = uninterrupted.state_dict(), resumed.state_dict()
    assert sd_a.keys() == sd_b.keys()
    for k in sd_a:
        torch.testing.assert_close(sd_b[k], sd_a[k], rtol=1e-5, atol=1e-6, msg=k)
