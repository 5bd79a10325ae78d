"""CompreSSMCallback inside a real transformers.Trainer (tiny toy SSM, CPU)."""

from __future__ import annotations

import json
import os
import types

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, TrainerControl, TrainerState

from compressm_hf import CompreSSMCallback as LazyCallback
from compressm_hf import find_reducible_layers
from compressm_hf.trainer import CompreSSMCallback, read_report
from compressm_hf.trainer.surgery import base_optimizer

from .common import SSM_PARAM_NAMES, Probe, make_args, make_model, make_trainer, ssm_params
from .toy_ssm import CountingDataset, NoSSMModel, ToySSMConfig, ToySSMForCausalLM


def _losses(trainer):
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


def _compressm_logs(trainer):
    return [h for h in trainer.state.log_history if any(k.startswith("compressm/") for k in h)]


def test_lazy_export():
    assert LazyCallback is CompreSSMCallback


@pytest.mark.parametrize(
    "reduction, selection, optimizer_state",
    [("balanced", "largest", "slice"), ("modal", "largest", "slice"), ("balanced", "random", "reset")],
)
def test_end_to_end_tolerance(tmp_path, reduction, selection, optimizer_state):
    model = make_model(state_sizes=(16, 16), reduction=reduction)
    steps = [4, 8, 12]
    cb = CompreSSMCallback(tau=0.1, steps=steps, selection=selection, optimizer_state=optimizer_state)
    probe = Probe(snapshot_steps=[12])
    args = make_args(tmp_path, max_steps=30, save_strategy="steps", save_steps=10)
    trainer = make_trainer(model, args, [cb, probe])
    trainer.train()

    # the Trainer was found on the call stack, no bind() needed
    assert cb.trainer is trainer
    assert cb.schedule_steps == steps
    sizes = [la.state_size for la in find_reducible_layers(model)]
    assert all(n < 16 for n in sizes)
    assert model.config.state_sizes == sizes
    rec = model.config.compression
    assert rec["tau"] == 0.1 and rec["mode"] == "tolerance" and rec["original_sizes"] == [16, 16]
    assert [e["step"] for e in rec["events"]] == steps
    assert rec["events"][-1]["sizes"] == sizes

    # every SSM parameter keeps training after the last cut; no stale parameter in the optimizer
    after_cut = {
        k: v for k, v in probe.snapshots[12]["model"].items() if k.rsplit(".", 1)[-1] in SSM_PARAM_NAMES
    }
    final = ssm_params(model)
    assert after_cut.keys() == final.keys()
    for name, value in final.items():
        assert value.shape == after_cut[name].shape
        assert (value - after_cut[name]).abs().max() > 0, name
    opt = base_optimizer(trainer.optimizer)
    assert {id(p) for g in opt.param_groups for p in g["params"]} == {id(p) for p in model.parameters()}
    assert {id(p) for p in opt.state} <= {id(p) for p in model.parameters()}

    losses = _losses(trainer)
    assert losses[-1] < losses[0]

    # logs through Trainer.log
    logs = _compressm_logs(trainer)
    assert [h["step"] for h in logs] == steps
    assert logs[-1]["compressm/mean_state_size"] == sum(sizes) / len(sizes)
    first = logs[0]
    for i in range(2):
        if f"compressm/layer_{i}/energy_kept" in first:
            assert 0 < first[f"compressm/layer_{i}/energy_kept"] <= 1
            assert first[f"compressm/layer_{i}/error_bound"] >= 0

    # the report: output dir and every checkpoint
    report = read_report(tmp_path)
    assert report["version"] == 1 and report["final_sizes"] == sizes
    assert [e["step"] for e in report["events"]] == steps
    layer0 = report["events"][0]["layers"][0]
    assert {
        "n_before",
        "n_after",
        "hsv",
        "error_bound",
        "energy_kept",
        "rule",
        "selection",
        "wall_time_s",
    } <= set(layer0)
    assert layer0["n_before"] == 16 and len(layer0["hsv"]) == 16 and layer0["selection"] == selection
    for ckpt, n_events in (("checkpoint-10", 2), ("checkpoint-20", 3), ("checkpoint-30", 3)):
        r = read_report(tmp_path / ckpt)
        assert len(r["events"]) == n_events
        saved = json.loads((tmp_path / ckpt / "config.json").read_text())
        assert saved["state_sizes"] == r["events"][-1]["sizes_after"]
        assert len(saved["compression"]["events"]) == n_events


def test_default_schedule_and_save_load_roundtrip(tmp_path):
    model = make_model(state_sizes=(16, 16))
    cb = CompreSSMCallback(tau=0.05)  # default: 4 attempts in the first 10% of max_steps
    trainer = make_trainer(model, make_args(tmp_path, max_steps=40), [cb])
    trainer.train()
    assert cb.schedule_steps == [1, 2, 3, 4]
    assert model.config.state_sizes != [16, 16]
    out = tmp_path / "final"
    trainer.save_model(str(out))
    ids = torch.randint(0, 12, (3, 7), generator=torch.Generator().manual_seed(1))
    model.eval()
    with torch.no_grad():
        ref = model(ids).logits
    loaded = ToySSMForCausalLM.from_pretrained(out).eval()
    assert loaded.config.state_sizes == model.config.state_sizes
    assert loaded.config.compression == model.config.compression
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, ref, rtol=0, atol=0)
    AutoConfig.register(ToySSMConfig.model_type, ToySSMConfig, exist_ok=True)
    AutoModelForCausalLM.register(ToySSMConfig, ToySSMForCausalLM, exist_ok=True)
    auto = AutoModelForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        torch.testing.assert_close(auto(ids).logits, ref, rtol=0, atol=0)


def test_gradient_accumulation_cuts_only_at_optimizer_steps(tmp_path):
    model = make_model(state_sizes=(12, 12))
    cb = CompreSSMCallback(tau=0.1, steps=[3, 6])
    probe = Probe(snapshot_steps=[6])
    args = make_args(tmp_path, max_steps=14, gradient_accumulation_steps=2, per_device_train_batch_size=4)
    trainer = make_trainer(model, args, [cb, probe])
    trainer.train()
    # the callback's hook (on_step_end) fires once per optimizer step, after each pair of micro-batches
    kinds = [k for k, _ in probe.events if k in ("substep", "step")]
    assert kinds == ["substep", "step"] * 14
    assert [s for k, s in probe.events if k == "step"] == list(range(1, 15))
    # at every step end (so at both cuts) the gradients were already zeroed
    assert not any(probe.grads_at_step_end.values())
    assert [e["step"] for e in cb.history] == [3, 6]
    assert model.config.state_sizes == cb.history[-1]["sizes_after"] != [12, 12]
    after = {k: v for k, v in probe.snapshots[6]["model"].items() if k.rsplit(".", 1)[-1] in SSM_PARAM_NAMES}
    for name, value in ssm_params(model).items():
        assert (value - after[name]).abs().max() > 0, name


def test_fixed_mode_round_to_and_min_state_size(tmp_path):
    model = make_model(state_sizes=(16, 10))
    cb = CompreSSMCallback(mode="fixed", fixed_fraction=0.5, steps=[2, 4, 6], round_to=4, min_state_size=6)
    trainer = make_trainer(model, make_args(tmp_path, max_steps=8), [cb])
    trainer.train()
    # 16 -> 8 -> (4 -> min 6 -> round 8 = no cut: gated) ; 10 -> (5 -> min 6 -> round 8) -> 8 gated
    assert model.config.state_sizes == [8, 8]
    assert all(n % 4 == 0 for n in model.config.state_sizes)
    reasons = [la.get("reason") for e in cb.history for la in e["layers"] if not la["reduced"]]
    assert reasons and set(reasons) == {"gate"}


def test_resume_from_compressed_checkpoint_matches_uninterrupted_run(tmp_path):
    steps = [3, 6, 14]
    # uninterrupted run, checkpoint at 10 (after two cuts, before the third)
    model_a = make_model(seed=3, state_sizes=(12, 12))
    cb_a = CompreSSMCallback(tau=0.1, steps=steps)
    args_a = make_args(tmp_path / "a", max_steps=20, save_strategy="steps", save_steps=10)
    make_trainer(model_a, args_a, [cb_a]).train()
    ckpt = tmp_path / "a" / "checkpoint-10"
    saved_state = json.loads((ckpt / "trainer_state.json").read_text())
    assert saved_state["stateful_callbacks"]["CompreSSMCallback"]["attributes"]["done_steps"] == [3, 6]
    assert read_report(ckpt)["final_sizes"] != [12, 12]

    # a fresh model at its ORIGINAL size resumes from the compressed checkpoint
    model_b = make_model(seed=3, state_sizes=(12, 12))
    cb_b = CompreSSMCallback(tau=0.1, steps=steps)
    args_b = make_args(tmp_path / "b", max_steps=20, save_strategy="steps", save_steps=10)
    trainer_b = make_trainer(model_b, args_b, [cb_b])
    trainer_b.train(resume_from_checkpoint=str(ckpt))

    assert model_b.config.state_sizes == model_a.config.state_sizes
    assert cb_b.done_steps == cb_a.done_steps == steps
    assert [e["step"] for e in cb_b.history] == steps
    assert cb_b.original_sizes == [12, 12]
    assert model_b.config.compression == model_a.config.compression
    sd_a, sd_b = model_a.state_dict(), model_b.state_dict()
    assert sd_a.keys() == sd_b.keys()
    for k in sd_a:
        torch.testing.assert_close(sd_b[k], sd_a[k], rtol=1e-5, atol=1e-6, msg=k)
    # the resumed run's final report holds the whole history
    assert [e["step"] for e in read_report(tmp_path / "b")["events"]] == steps


def test_resume_with_transformers_callback_state_restore(tmp_path):
    model_a = make_model(seed=1, state_sizes=(10, 10))
    args_a = make_args(tmp_path / "a", max_steps=12, save_strategy="steps", save_steps=6)
    make_trainer(model_a, args_a, [CompreSSMCallback(tau=0.1, steps=[2, 4, 8])]).train()
    model_b = make_model(seed=1, state_sizes=(10, 10))
    args_b = make_args(
        tmp_path / "b", max_steps=12, save_strategy="no", restore_callback_states_from_checkpoint=True
    )
    trainer_b = make_trainer(model_b, args_b, [CompreSSMCallback(tau=0.1, steps=[2, 4, 8])])
    trainer_b.train(resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-6"))
    # transformers replaced the callback by one rebuilt from the checkpoint (type(cb)(**args) + attributes)
    (cb,) = [c for c in trainer_b.callback_handler.callbacks if isinstance(c, CompreSSMCallback)]
    assert cb.done_steps == [2, 4, 8] and [e["step"] for e in cb.history] == [2, 4, 8]
    assert model_b.config.state_sizes == model_a.config.state_sizes
    for k, v in model_a.state_dict().items():
        torch.testing.assert_close(model_b.state_dict()[k], v, rtol=1e-5, atol=1e-6)


def test_pragmatic_rollback_is_exact(tmp_path):
    model = make_model(state_sizes=(12, 12))
    # eval_loss falls while training, so "greater is better" turns every improvement into a "drop":
    # the comparison at the first evaluation after the cut must roll back.
    cb = CompreSSMCallback(
        mode="pragmatic",
        steps=[6, 12],
        pragmatic_tolerance=0.0,
        metric_for_pragmatic="loss",
        greater_is_better=True,
    )
    pre = Probe(snapshot_steps=[6])  # before CompreSSMCallback in the list: sees the pre-cut state
    post = Probe(snapshot_steps=[8], on="evaluate")  # after it: sees the rolled-back state
    args = make_args(
        tmp_path, max_steps=16, eval_strategy="steps", eval_steps=4, save_strategy="steps", save_steps=8
    )
    trainer = make_trainer(model, args, [pre, cb, post], eval_dataset=CountingDataset(size=16, seed=1))
    trainer.train()

    kinds = [(e["kind"], e["step"]) for e in cb.history]
    assert kinds == [("reduction", 6), ("rollback", 8)]
    assert cb.history[0]["sizes_after"] == [10, 10]  # fixed 10%: floor(0.9 * 12)
    assert cb.stopped and cb.pending is None
    assert 12 in cb.done_steps  # attempted, but cutting had stopped
    ref, got = pre.snapshots[6], post.snapshots[8]
    assert got["sizes"] == ref["sizes"] == [12, 12]
    assert got["model"].keys() == ref["model"].keys()
    for k, v in ref["model"].items():
        assert torch.equal(got["model"][k], v), k
    assert got["optimizer"].keys() == ref["optimizer"].keys()
    for name, st in ref["optimizer"].items():
        assert st.keys() == got["optimizer"][name].keys()
        for key, value in st.items():
            assert torch.equal(got["optimizer"][name][key], value), (name, key)
    # the groups hold the model's live parameters at the same positions
    opt = base_optimizer(trainer.optimizer)
    assert [len(g) for g in got["groups"]] == [len(g) for g in ref["groups"]]
    assert {id(p) for g in opt.param_groups for p in g["params"]} == {id(p) for p in model.parameters()}
    assert model.config.state_sizes == [12, 12] and [
        la.state_size for la in find_reducible_layers(model)
    ] == [12, 12]
    # training went on after the rollback with every SSM parameter updating
    for name, value in ssm_params(model).items():
        assert (value - got["model"][name]).abs().max() > 0, name
    logs = _compressm_logs(trainer)
    assert logs[-1]["compressm/rolled_back"] == 1.0
    assert read_report(tmp_path / "checkpoint-8")["stopped"] is True
    # the rolled-back model was what the step-8 checkpoint saved
    assert json.loads((tmp_path / "checkpoint-8" / "config.json").read_text())["state_sizes"] == [12, 12]


def test_pragmatic_keeps_cuts_within_tolerance(tmp_path):
    model = make_model(state_sizes=(12, 12))
    cb = CompreSSMCallback(mode="pragmatic", steps=[4, 8], pragmatic_tolerance=10.0)
    args = make_args(tmp_path, max_steps=12, eval_strategy="steps", eval_steps=4)
    trainer = make_trainer(model, args, [cb], eval_dataset=CountingDataset(size=16, seed=1))
    trainer.train()
    assert [(e["kind"], e["step"]) for e in cb.history] == [("reduction", 4), ("reduction", 8)]
    assert model.config.state_sizes == [9, 9]  # 12 -> 10 -> 9
    assert cb.pending is None and not cb.stopped


def test_bind_overrides_stack_lookup(tmp_path):
    model = make_model(state_sizes=(8, 8))
    cb = CompreSSMCallback(tau=0.1, steps=[2])
    trainer = make_trainer(model, make_args(tmp_path, max_steps=3), [cb])
    sentinel = types.SimpleNamespace(
        log=lambda logs: sentinel.logged.append(logs), logged=[], model_wrapped=None
    )
    assert cb.bind(sentinel) is cb
    trainer.train()
    assert cb.trainer is sentinel and len(sentinel.logged) == 1
    assert "compressm/mean_state_size" in sentinel.logged[0]


# ----------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"tau": -0.1}, r"\[0, 1\)"),
        ({"tau": 1.0}, r"\[0, 1\)"),
        ({"tau": float("nan")}, r"\[0, 1\)"),
        ({"tau": 0.1, "mode": "aggressive"}, "mode must be one of"),
        ({"tau": 0.1, "selection": "median"}, "selection must be one of"),
        ({"tau": 0.1, "optimizer_state": "zero"}, "optimizer_state must be one of"),
        ({"tau": 0.1, "steps": []}, "empty"),
        ({"tau": 0.1, "steps": [0]}, "positive integers"),
        ({"tau": 0.1, "window": (0.5, 0.2)}, "start < end"),
        ({"tau": 0.1, "attempts": 0}, "attempts"),
        ({"tau": 0.1, "gate": 0.0}, "gate"),
        ({"tau": 0.1, "min_state_size": 0}, "min_state_size"),
        ({"tau": 0.1, "round_to": 0}, "round_to"),
        ({"mode": "fixed", "fixed_fraction": 1.0}, "fixed_fraction"),
        ({"mode": "pragmatic", "pragmatic_tolerance": -1}, "pragmatic_tolerance"),
        ({"tau": 0.1, "seed": 1.5}, "seed"),
    ],
)
def test_bad_arguments_at_construction(kwargs, match):
    with pytest.raises(ValueError, match=match):
        CompreSSMCallback(**kwargs)


def _assert_fails_before_training(trainer, match):
    with pytest.raises(ValueError, match=match):
        trainer.train()
    assert trainer.state.global_step == 0


def test_model_without_reducible_layers(tmp_path):
    model = NoSSMModel(ToySSMConfig())
    trainer = make_trainer(model, make_args(tmp_path, max_steps=5), [CompreSSMCallback(tau=0.1)])
    _assert_fails_before_training(trainer, "no reducible SSM layer")


def test_schedule_beyond_max_steps(tmp_path):
    trainer = make_trainer(
        make_model(), make_args(tmp_path, max_steps=5), [CompreSSMCallback(tau=0.1, steps=[3, 9])]
    )
    _assert_fails_before_training(trainer, "beyond max_steps=5")


def test_pragmatic_without_evaluation(tmp_path):
    trainer = make_trainer(
        make_model(), make_args(tmp_path, max_steps=5), [CompreSSMCallback(mode="pragmatic")]
    )
    _assert_fails_before_training(trainer, "eval_strategy")


def test_unknown_max_steps_with_fractional_window():
    cb = CompreSSMCallback(tau=0.1)
    args = types.SimpleNamespace(output_dir=None)
    with pytest.raises(ValueError, match="needs a known run length"):
        cb.on_train_begin(args, TrainerState(max_steps=0), TrainerControl(), model=make_model())


def test_without_a_trainer_logs_go_to_log_history(tmp_path):
    model = make_model(state_sizes=(8, 8))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    ids = torch.randint(0, 12, (4, 6))
    model(ids, labels=ids).loss.backward()
    opt.step()
    cb = CompreSSMCallback(tau=0.1, steps=[1])
    args = types.SimpleNamespace(output_dir=str(tmp_path))
    state, control = TrainerState(max_steps=4), TrainerControl()
    cb.on_train_begin(args, state, control, model=model, optimizer=opt)
    assert cb.trainer is None
    state.global_step = 1
    cb.on_step_end(args, state, control, model=model, optimizer=opt)
    assert state.log_history and "compressm/mean_state_size" in state.log_history[-1]
    logs = {"loss": 1.0}
    cb.on_log(args, state, control, logs=logs)
    assert "compressm/mean_state_size" in logs
    assert os.path.isfile(tmp_path / "compression_report.json")
    assert model.config.state_sizes == cb.history[-1]["sizes_after"]


def test_pragmatic_pending_cut_survives_a_checkpoint(tmp_path):
    def run(output_dir, resume=None):
        model = make_model(seed=5, state_sizes=(10, 10))
        cb = CompreSSMCallback(
            mode="pragmatic",
            steps=[3],
            pragmatic_tolerance=0.0,
            metric_for_pragmatic="loss",
            greater_is_better=True,
        )
        args = make_args(
            output_dir, max_steps=8, eval_strategy="steps", eval_steps=6, save_strategy="steps", save_steps=4
        )
        make_trainer(model, args, [cb], eval_dataset=CountingDataset(size=16, seed=1)).train(
            resume_from_checkpoint=resume
        )
        return model, cb

    # cut at 3, checkpoint at 4 while the cut awaits its evaluation (at 6, where it is rolled back)
    model_a, cb_a = run(tmp_path / "a")
    assert [e["kind"] for e in cb_a.history] == ["reduction", "rollback"]
    assert os.path.isfile(tmp_path / "a" / "checkpoint-4" / "compressm_pragmatic_snapshot.pt")
    model_b, cb_b = run(tmp_path / "b", resume=str(tmp_path / "a" / "checkpoint-4"))
    assert [e["kind"] for e in cb_b.history] == ["reduction", "rollback"] and cb_b.stopped
    assert model_b.config.state_sizes == model_a.config.state_sizes == [10, 10]
    for k, v in model_a.state_dict().items():
        torch.testing.assert_close(model_b.state_dict()[k], v, rtol=1e-5, atol=1e-6)


def test_no_arguments_uses_the_one_default_tau():
    # the user's API: Trainer(callbacks=[CompreSSMCallback()]); the same tau as compressm-train's default
    from compressm_hf.trainer import defaults

    callback = CompreSSMCallback()
    assert callback.tau == defaults.TAU == defaults.CLI_TAU
    assert callback.config_dict() == CompreSSMCallback(tau=defaults.TAU).config_dict()
