"""Optimizer-state transplant, rollback snapshots and the distributed helpers (single process)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from compressm_hf import ParamSwap, find_reducible_layers
from compressm_hf.trainer.surgery import (
    base_optimizer,
    broadcast_objects,
    move_to_cpu,
    rebuild_ddp_in_place_,
    restore_training_state,
    snapshot_training_state,
    transplant_optimizer_state,
)

from .common import SSM_PARAM_NAMES, make_model, optimizer_state_by_name


class Wrapper:  # the shape of accelerate's AcceleratedOptimizer: .optimizer + delegation
    def __init__(self, optimizer):
        self.optimizer = optimizer

    @property
    def param_groups(self):
        return self.optimizer.param_groups


def _trained_adamw(params, steps=3, **kw):
    opt = torch.optim.AdamW([{"params": params[:1], "lr": 1e-2}, {"params": params[1:], "lr": 5e-3}], **kw)
    for _ in range(steps):
        opt.zero_grad()
        sum((p**2).sum() * (i + 1) for i, p in enumerate(params)).backward()
        opt.step()
    return opt


def test_base_optimizer_unwraps():
    p = nn.Parameter(torch.zeros(2))
    opt = torch.optim.SGD([p], lr=0.1)
    assert base_optimizer(Wrapper(Wrapper(opt))) is opt
    assert base_optimizer(opt) is opt
    with pytest.raises(TypeError):
        base_optimizer(object())


@pytest.mark.parametrize("amsgrad", [False, True])
def test_keep_index_select_exact(amsgrad):
    old = nn.Parameter(torch.randn(6, 3))
    other = nn.Parameter(torch.randn(4))
    opt = _trained_adamw([other, old], amsgrad=amsgrad)
    before = {k: v.clone() for k, v in opt.state[old].items()}
    keep = torch.tensor([0, 2, 5])
    new = nn.Parameter(old.detach()[keep].clone())
    counts = transplant_optimizer_state(Wrapper(opt), [ParamSwap(old, new, 0, keep)], "slice")
    assert counts["swapped"] == 1 and counts["carried"] == 1
    assert opt.param_groups[1]["params"] == [new] and opt.param_groups[1]["lr"] == 5e-3
    assert old not in opt.state and new in opt.state
    st = opt.state[new]
    assert torch.equal(st["step"], before["step"])  # scalar step kept
    keys = ["exp_avg", "exp_avg_sq"] + (["max_exp_avg_sq"] if amsgrad else [])
    for k in keys:
        assert st[k].shape == new.shape
        assert torch.equal(st[k], before[k][keep])
    # no stale tensors anywhere
    live = {id(p) for g in opt.param_groups for p in g["params"]}
    assert all(id(p) in live for p in opt.state)
    opt.zero_grad()
    (new**2).sum().backward()
    w = new.detach().clone()
    opt.step()
    assert (new.detach() - w).abs().max() > 0


def test_leading_slice_without_keep_and_state_dim_last_axis():
    old = nn.Parameter(torch.randn(3, 8))  # states along dim 1 (a C matrix)
    opt = _trained_adamw([nn.Parameter(torch.randn(2)), old])
    before = {k: v.clone() for k, v in opt.state[old].items()}
    new = nn.Parameter(torch.randn(3, 5))
    transplant_optimizer_state(opt, [ParamSwap(old, new, 1, None)], "slice")
    st = opt.state[new]
    assert torch.equal(st["exp_avg"], before["exp_avg"][:, :5])
    assert torch.equal(st["exp_avg_sq"], before["exp_avg_sq"][:, :5])
    assert torch.equal(st["step"], before["step"])


def test_reset_gives_zero_moments_and_keeps_step():
    old = nn.Parameter(torch.randn(8))
    opt = _trained_adamw([nn.Parameter(torch.randn(2)), old])
    step = opt.state[old]["step"].clone()
    new = nn.Parameter(torch.randn(4))
    counts = transplant_optimizer_state(opt, [ParamSwap(old, new, 0, torch.arange(4))], "reset")
    assert counts["reset"] == 1
    st = opt.state[new]
    assert torch.equal(st["step"], step)
    assert st["exp_avg"].shape == (4,) and not st["exp_avg"].any() and not st["exp_avg_sq"].any()


def test_same_shape_swap_copies_state_and_unknown_param_stays_out():
    old = nn.Parameter(torch.randn(4))
    frozen_old = nn.Parameter(torch.randn(5))
    opt = _trained_adamw([nn.Parameter(torch.randn(2)), old])
    before = opt.state[old]["exp_avg"].clone()
    new = nn.Parameter(old.detach().clone())
    frozen_new = nn.Parameter(torch.randn(3))
    transplant_optimizer_state(
        opt, [ParamSwap(old, new, None, None), ParamSwap(frozen_old, frozen_new, 0, None)], "reset"
    )
    assert torch.equal(opt.state[new]["exp_avg"], before)
    assert all(p is not frozen_new for g in opt.param_groups for p in g["params"])
    assert frozen_new not in opt.state


def test_sgd_momentum_buffer_is_carried():
    old = nn.Parameter(torch.randn(6))
    opt = torch.optim.SGD([old], lr=0.1, momentum=0.9)
    (old**2).sum().backward()
    opt.step()
    buf = opt.state[old]["momentum_buffer"].clone()
    keep = torch.tensor([1, 3])
    new = nn.Parameter(old.detach()[keep].clone())
    transplant_optimizer_state(opt, [(old, new, 0, keep)], "slice")  # duck-typed 4-tuple
    assert torch.equal(opt.state[new]["momentum_buffer"], buf[keep])


def test_bad_mode():
    with pytest.raises(ValueError, match="optimizer_state"):
        transplant_optimizer_state(torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1), [], "zero")


@pytest.mark.parametrize("reduction", ["balanced", "modal"])
def test_toy_layer_reduce_then_transplant_updates_every_ssm_param(reduction):
    from compressm_hf import RankPolicy, plan_reduction

    model = make_model(state_sizes=(8, 8), reduction=reduction)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    ids = torch.randint(0, 12, (4, 6))
    for _ in range(2):
        opt.zero_grad()
        model(ids, labels=ids).loss.backward()
        opt.step()
    swaps = []
    for layer in find_reducible_layers(model):
        plan = plan_reduction(layer.lti_system(), RankPolicy(tau=0.0, mode="fixed", fixed_fraction=0.5))
        swaps += layer.reduce_(plan)
    assert model.config.state_sizes == [4, 4]
    transplant_optimizer_state(opt, swaps)
    assert {id(p) for g in opt.param_groups for p in g["params"]} == {id(p) for p in model.parameters()}
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt.zero_grad()
    model(ids, labels=ids).loss.backward()
    opt.step()
    for n, p in model.named_parameters():
        if n.rsplit(".", 1)[-1] in SSM_PARAM_NAMES:
            assert (p.detach() - before[n]).abs().max() > 0, n


def test_snapshot_restore_is_exact():
    from compressm_hf import RankPolicy, plan_reduction

    model = make_model(state_sizes=(8, 6))
    opt = torch.optim.AdamW(
        [
            {"params": [p for n, p in model.named_parameters() if "mixers" in n], "lr": 1e-3},
            {"params": [p for n, p in model.named_parameters() if "mixers" not in n], "lr": 1e-2},
        ]
    )
    ids = torch.randint(0, 12, (4, 6))
    opt.zero_grad()
    model(ids, labels=ids).loss.backward()
    opt.step()
    layers = find_reducible_layers(model)
    snap = snapshot_training_state(model, opt, layers)
    ref_model = {k: v.clone() for k, v in model.state_dict().items()}
    ref_opt = optimizer_state_by_name(model, opt)
    swaps = []
    for layer in layers:
        swaps += layer.reduce_(plan_reduction(layer.lti_system(), RankPolicy(tau=0.0, mode="fixed")))
    transplant_optimizer_state(opt, swaps)
    opt.zero_grad()
    model(ids, labels=ids).loss.backward()
    opt.step()
    assert model.config.state_sizes != [8, 6]
    restore_training_state(model, opt, layers, snap)
    assert model.config.state_sizes == [8, 6] and [la.state_size for la in layers] == [8, 6]
    sd = model.state_dict()
    assert all(torch.equal(sd[k], v) for k, v in ref_model.items())
    got = optimizer_state_by_name(model, opt)
    assert got.keys() == ref_opt.keys()
    for name, st in ref_opt.items():
        for k, v in st.items():
            assert torch.equal(got[name][k], v), (name, k)
    assert {id(p) for g in opt.param_groups for p in g["params"]} == {id(p) for p in model.parameters()}
    assert len(opt.param_groups[0]["params"]) == len(snap["groups"][0])


def test_move_to_cpu_and_broadcast_identity():
    from compressm_hf import ReductionPlan

    plan = ReductionPlan(
        n=4,
        rank=2,
        hsv=torch.ones(4, requires_grad=True),
        energy_kept=0.5,
        error_bound=1.0,
        rule="modal",
        keep=torch.tensor([0, 1]),
    )
    moved = move_to_cpu([plan, None, (torch.ones(1), 3)])
    assert isinstance(moved[0], ReductionPlan) and not moved[0].hsv.requires_grad
    assert broadcast_objects([plan, 7])[1] == 7


@pytest.fixture
def gloo_world_of_one(tmp_path):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def test_broadcast_and_ddp_rebuild_in_a_world_of_one(gloo_world_of_one):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    from compressm_hf import RankPolicy, plan_reduction
    from compressm_hf.trainer.surgery import ddp_init_kwargs, is_distributed

    assert is_distributed()
    model = make_model(state_sizes=(8, 8))
    ddp = DDP(model, find_unused_parameters=True)
    kwargs = ddp_init_kwargs(ddp)
    layers = find_reducible_layers(ddp)  # works through the wrapper
    plans = [
        plan_reduction(la.lti_system(), RankPolicy(tau=0.0, mode="fixed", fixed_fraction=0.5))
        for la in layers
    ]
    (got,) = broadcast_objects([plans])  # the real broadcast_object_list path
    assert [p.rank for p in got] == [4, 4] and got[0].hsv.device.type == "cpu"
    swaps = []
    for la, plan in zip(layers, got):
        swaps += la.reduce_(plan)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    assert rebuild_ddp_in_place_(ddp) is True
    assert ddp_init_kwargs(ddp) == kwargs
    assert {id(p) for p in ddp._module_parameters} == {id(p) for p in model.parameters()}
    ids = torch.randint(0, 12, (2, 5))
    ddp(ids, labels=ids).loss.backward()
    new_params = [p for n, p in model.named_parameters() if n.rsplit(".", 1)[-1] in SSM_PARAM_NAMES]
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in new_params)
    opt.step()
    assert dist.get_world_size() == 1
    assert rebuild_ddp_in_place_(model) is False  # not a DDP wrapper: no-op
