"""Fast checks of the CompreSSM baselines (tiny LRU models, the real Trainer)."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from transformers import Trainer

from compressm_hf.modeling.lru import LRUConfig, LRUForCausalLM, LRUForSequenceClassification
from compressm_hf.protocol import find_reducible_layers
from compressm_hf.trainer.baselines import (
    DistillationTrainer,
    GradientPruningCallback,
    HNNTrainer,
    LoraDistillationTrainer,
    RewindTrainer,
    WeightSnapshotCallback,
    balanced_truncate_,
    differentiable_lru_system,
    distillation_loss,
    final_state_sizes,
    hankel_nuclear_norm,
    make_lora_student,
    original_lr,
    prune_states_,
    rewind_weights_,
    scratch_config,
    scratch_model,
    student_from_teacher,
)
from compressm_hf.trainer.baselines._common import LRU_STATE_PARAMS

from .helpers import tiny_classifier, tiny_config, tiny_dataset, training_args


@pytest.fixture
def batch():
    ds = tiny_dataset(8)
    rows = ds[:8]
    return {"inputs_embeds": rows["inputs_embeds"], "labels": rows["labels"]}


def sizes(model):
    return [int(layer.state_size) for layer in find_reducible_layers(model)]


# ------------------------------------------------------------------------------------------------- scratch


def test_scratch_builds_exact_sizes_from_model_report_and_list(tmp_path):
    compressed = tiny_classifier(state_size=8)
    prune_states_(compressed, [5, 3])
    base = tiny_config(state_size=8)
    for source in (compressed, [5, 3], {"events": [{"sizes_after": [6, 6]}, {"sizes_after": [5, 3]}]}):
        model = scratch_model(LRUForSequenceClassification, base, source)
        assert sizes(model) == [5, 3] and model.config.state_sizes == [5, 3]
    (tmp_path / "compression_report.json").write_text(json.dumps({"events": [{"sizes_after": [5, 3]}]}))
    assert final_state_sizes(tmp_path) == [5, 3]
    cfg = scratch_config(base, tmp_path / "compression_report.json")
    assert cfg.state_sizes == [5, 3] and base.state_sizes == [8, 8]  # the base config is not touched
    assert sizes(LRUForSequenceClassification(cfg)) == [5, 3]
    with pytest.raises(ValueError):
        scratch_config(base, [4, 4, 4])


# ------------------------------------------------------------------------------------------------------ KD


def test_kd_loss_uses_teacher_and_alpha_zero_is_ce(tmp_path, batch):
    student, teacher = tiny_classifier(0), tiny_classifier(1)
    args = training_args(tmp_path)
    tr = DistillationTrainer(model=student, args=args, teacher=teacher, alpha=0.5, temperature=2.0)
    student.train()
    loss_a = tr.compute_loss(student, dict(batch))
    other = tiny_classifier(2)
    tr_b = DistillationTrainer(model=student, args=args, teacher=other, alpha=0.5, temperature=2.0)
    loss_b = tr_b.compute_loss(student, dict(batch))
    assert not torch.allclose(loss_a, loss_b)
    ce = student(**batch).loss
    tr0 = DistillationTrainer(model=student, args=args, teacher=teacher, alpha=0.0)
    torch.testing.assert_close(tr0.compute_loss(student, dict(batch)), ce)
    # teacher is frozen, in eval mode, and gets no gradient
    loss_a.backward()
    assert not teacher.training and all(p.grad is None and not p.requires_grad for p in teacher.parameters())
    # alpha=1: pure KL; a student equal to the teacher has zero KL
    logits = torch.randn(4, 5)
    torch.testing.assert_close(
        distillation_loss(torch.tensor(0.0), logits, logits.clone(), alpha=1.0), torch.tensor(0.0)
    )


def test_kd_causal_lm_and_trainer_runs(tmp_path):
    import datasets

    cfg = LRUConfig(vocab_size=16, hidden_size=8, num_hidden_layers=1, state_size=4)
    torch.manual_seed(0)
    teacher, student = LRUForCausalLM(cfg), LRUForCausalLM(copy.deepcopy(cfg))
    ids = torch.randint(0, 16, (16, 10))
    ds = datasets.Dataset.from_dict({"input_ids": ids.numpy(), "labels": ids.numpy()}).with_format("torch")
    tr = DistillationTrainer(
        model=student, args=training_args(tmp_path, 2), train_dataset=ds, teacher=teacher
    )
    assert tr.causal_lm
    tr.train()
    assert torch.isfinite(torch.tensor(tr.last_losses["loss"]))


# ----------------------------------------------------------------------------------------------------- HNN


def test_hnn_gradient_reaches_all_lru_parameters():
    model = tiny_classifier()
    reg = hankel_nuclear_norm(model)
    reg.backward()
    mixer = find_reducible_layers(model)[0]
    for name in LRU_STATE_PARAMS:
        g = getattr(mixer, name).grad
        assert g is not None and torch.isfinite(g).all() and g.abs().sum() > 0, name
    # same system as the (detached) lti_system()
    lam, B, C = differentiable_lru_system(mixer)
    ref = mixer.lti_system()
    torch.testing.assert_close(lam.detach(), ref.A)
    torch.testing.assert_close(B.detach(), ref.B)
    torch.testing.assert_close(C.detach(), ref.C)


def test_hnn_lowers_hankel_nuclear_norm_and_truncates(tmp_path):
    ds = tiny_dataset(32)
    out = {}
    for lam in (0.0, 0.2):
        model = tiny_classifier(0)
        tr = HNNTrainer(
            model=model, args=training_args(tmp_path, 6, warmup_steps=0), train_dataset=ds, hnn_lambda=lam
        )
        tr.train()
        out[lam] = float(hankel_nuclear_norm(model).detach())
        if lam > 0:
            assert tr.last_hnn is not None
            cut = balanced_truncate_(model, tau=0.3)
            assert cut["sizes_after"] == sizes(model) == model.config.state_sizes
            assert all(a <= b for a, b in zip(cut["sizes_after"], cut["sizes_before"]))
            assert any(a < b for a, b in zip(cut["sizes_after"], cut["sizes_before"]))
            x = ds[:4]["inputs_embeds"]
            assert torch.isfinite(model(inputs_embeds=x).logits).all()
    assert out[0.2] < out[0.0]


# ------------------------------------------------------------------------------------------ gradient pruning


def test_gradient_pruning_reaches_target_and_optimizer_is_clean(tmp_path):
    model = tiny_classifier(0)
    ds = tiny_dataset(32)
    cb = GradientPruningCallback(target=[3, 5], every=2, window=(0.0, 0.75))
    tr = Trainer(model=model, args=training_args(tmp_path, 8), train_dataset=ds, callbacks=[cb])
    tr.train()
    assert sizes(model) == [3, 5] == model.config.state_sizes
    assert len(cb.events) >= 2 and cb.events[-1]["sizes_after"] == [3, 5]
    opt = tr.optimizer
    in_groups = {id(p) for g in opt.param_groups for p in g["params"]}
    params = {id(p) for p in model.parameters() if p.requires_grad}
    assert in_groups == params  # every live parameter is optimized, no stale (removed) one is left
    for p, st in opt.state.items():
        assert id(p) in params
        assert st["exp_avg"].shape == p.shape


# ------------------------------------------------------------------------------------------------ rewinding


def test_rewound_lr_schedule_replays_original(tmp_path):
    total, k = 20, 8
    args = training_args(tmp_path, total - k, warmup_steps=4)
    model = tiny_classifier()
    tr = RewindTrainer(
        model=model, args=args, train_dataset=tiny_dataset(), rewind_to_step=k, schedule_total_steps=total
    )
    tr.create_optimizer_and_scheduler(num_training_steps=total - k)
    lrs = []
    for _ in range(total - k):
        lrs.append(tr.optimizer.param_groups[0]["lr"])
        tr.optimizer.step()
        tr.lr_scheduler.step()
    expected = [original_lr(args, total, s) for s in range(k, total)]
    assert lrs == pytest.approx(expected, rel=1e-9, abs=1e-12)
    assert lrs[0] > 0 and lrs[-1] < lrs[0]


def test_weight_rewinding_restores_sliced_early_weights(tmp_path):
    ds = tiny_dataset(32)
    model = tiny_classifier(0)
    snap_cb = WeightSnapshotCallback(step=2)
    tr = Trainer(model=model, args=training_args(tmp_path, 5), train_dataset=ds, callbacks=[snap_cb])
    tr.train()
    snapshot = snap_cb.snapshot
    assert snapshot is not None
    assert not torch.equal(
        snapshot["model.layers.0.mixer.nu_log"], model.model.layers[0].mixer.nu_log.detach()
    )
    keeps = prune_states_(model, [4, 6], criterion="hsv")
    assert sizes(model) == [4, 6]
    rewind_weights_(model, snapshot, keeps)
    mixer = model.model.layers[0].mixer
    torch.testing.assert_close(mixer.nu_log.detach(), snapshot["model.layers.0.mixer.nu_log"][keeps[0]])
    torch.testing.assert_close(mixer.C_re.detach(), snapshot["model.layers.0.mixer.C_re"][:, keeps[0]])
    torch.testing.assert_close(model.classifier.weight.detach(), snapshot["classifier.weight"])
    # magnitude criterion keeps the largest-|param| states
    m2 = tiny_classifier(3)
    keep = prune_states_(m2, 2, criterion="magnitude")
    assert sizes(m2) == [2, 2] and keep[0].numel() == 2


# ------------------------------------------------------------------------------------------------- LoRA-KD


def test_lora_kd_trains_only_adapters_and_projection(tmp_path):
    teacher = tiny_classifier(0)
    student = make_lora_student(student_from_teacher(teacher, [4, 4]), r=2)
    assert sizes(student) == [4, 4]
    ds = tiny_dataset(32)
    tr = LoraDistillationTrainer(
        model=student, args=training_args(tmp_path, 3), train_dataset=ds, teacher=teacher, align_weight=1.0
    )
    trainable = {n for n, p in student.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    frozen_before = {n: p.detach().clone() for n, p in student.named_parameters() if not p.requires_grad}
    proj_before = [p.detach().clone() for p in tr.alignment.parameters()]
    tr.train()
    opt_params = {id(p) for g in tr.optimizer.param_groups for p in g["params"]}
    allowed = {id(p) for p in student.parameters() if p.requires_grad} | {
        id(p) for p in tr.alignment.parameters()
    }
    assert opt_params == allowed
    for n, p in student.named_parameters():
        if n in frozen_before:
            assert torch.equal(p.detach(), frozen_before[n]), n
    assert any(not torch.equal(a, b.detach()) for a, b in zip(proj_before, tr.alignment.parameters()))
    assert "align" in tr.last_losses


# -------------------------------------------------------------------------------------------------- Mamba


def test_mamba_state_scores_and_pruning():
    from compressm_hf.modeling.mamba import CompreSSMMambaConfig, CompreSSMMambaForCausalLM
    from compressm_hf.trainer.baselines import state_saliency, state_scores

    torch.manual_seed(0)
    cfg = CompreSSMMambaConfig(vocab_size=32, hidden_size=16, num_hidden_layers=1, state_size=8)
    model = CompreSSMMambaForCausalLM(cfg)
    layer = find_reducible_layers(model)[0]
    ids = torch.randint(0, 32, (2, 12))
    model(input_ids=ids, labels=ids).loss.backward()
    sal = state_saliency(layer)
    assert sal.shape == (8,) and torch.isfinite(sal).all() and sal.sum() > 0
    # x_proj's B/C rows count: zeroing their gradient lowers the score
    layer.x_proj.weight.grad.zero_()
    assert (state_saliency(layer) <= sal + 1e-12).all() and state_saliency(layer).sum() < sal.sum()
    assert state_scores(layer, "magnitude").shape == (8,)
    keep = prune_states_(model, 5, criterion="magnitude")
    assert sizes(model) == [5] == model.config.state_sizes and keep[0].numel() == 5
    assert torch.isfinite(model(input_ids=ids, labels=ids).loss)
