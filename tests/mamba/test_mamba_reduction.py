"""The reduction protocol on CompreSSM Mamba: surrogate statistics, modal reduce_, resize_, loading."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from compressm_hf import LTISystem, RankPolicy, ReductionPlan, find_reducible_layers, plan_reduction
from compressm_hf.modeling.mamba import (
    CompreSSMMambaConfig,
    CompreSSMMambaForCausalLM,
    MissingStatisticsError,
)

VOCAB = 64


def tiny_model(state_sizes=(8, 4), seed=0) -> CompreSSMMambaForCausalLM:
    torch.manual_seed(seed)
    cfg = CompreSSMMambaConfig(
        vocab_size=VOCAB, hidden_size=16, num_hidden_layers=len(state_sizes), state_sizes=list(state_sizes)
    )
    return CompreSSMMambaForCausalLM(cfg).eval()


def ids(batch=2, length=10, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, VOCAB, (batch, length), generator=g)


def logits(model, input_ids):
    with torch.no_grad():
        return model(input_ids).logits


def modal_plan(n, keep) -> ReductionPlan:
    keep = torch.as_tensor(keep, dtype=torch.long)
    return ReductionPlan(
        n=n,
        rank=len(keep),
        hsv=torch.ones(n, dtype=torch.float64),
        energy_kept=len(keep) / n,
        error_bound=0.0,
        rule="modal",
        keep=keep,
    )


def collect(model, batches=2, length=12):
    model.train()
    model.set_collect_statistics(True)
    with torch.no_grad():
        for i in range(batches):
            model(ids(2, length, seed=10 + i))
    model.set_collect_statistics(False)
    model.eval()


# ---------------------------------------------------------------------------------------------- statistics


def test_protocol_attributes_and_discovery():
    model = tiny_model((8, 4, 2) if False else (8, 4))
    layers = find_reducible_layers(model)
    assert [m.layer_idx for m in layers] == [0, 1]
    assert [m.state_size for m in layers] == [8, 4]


def test_lti_system_without_statistics_raises():
    mixer = tiny_model().backbone.layers[0].mixer
    with pytest.raises(MissingStatisticsError, match="collect_statistics") as err:
        mixer.lti_system()
    assert isinstance(err.value, ValueError)


def test_statistics_only_while_flag_on_and_training():
    model = tiny_model()
    mixer = model.backbone.layers[0].mixer
    model.set_collect_statistics(True)
    with torch.no_grad():
        model(ids())  # eval mode: nothing
    assert mixer.statistics_tokens == 0
    model.train()
    model.set_collect_statistics(False)
    with torch.no_grad():
        model(ids())  # flag off: nothing
    assert mixer.statistics_tokens == 0
    model.set_collect_statistics(True)
    model(ids(2, 10))
    model(ids(3, 5))
    assert mixer.statistics_tokens == 2 * 10 + 3 * 5
    mask = torch.ones(2, 10, dtype=torch.long)
    mask[0, :4] = 0
    model(ids(2, 10), attention_mask=mask)  # padding tokens are not counted
    assert mixer.statistics_tokens == 35 + 16
    mixer.reset_statistics()
    assert mixer.statistics_tokens == 0
    with pytest.raises(MissingStatisticsError):
        mixer.lti_system()


def test_surrogate_shapes_stability_and_description():
    model = tiny_model((8, 4))
    collect(model)
    for mixer in model.mixers():
        sys = mixer.lti_system()
        d, n = mixer.intermediate_size, mixer.state_size
        assert isinstance(sys, LTISystem)
        assert sys.A.shape == (d, n) and sys.B.shape == (d, n, 1) and sys.C.shape == (d, 1, n)
        assert sys.A.dtype == sys.B.dtype == sys.C.dtype == torch.float64
        assert sys.diagonal and sys.reduction == "modal"
        assert ((sys.A >= 0) & (sys.A < 1)).all()
        assert (sys.B >= 0).all() and (sys.C >= 0).all() and torch.isfinite(sys.B).all()
        assert "48 tokens" in sys.surrogate
        assert not sys.A.requires_grad


def _scan_inputs(mixer, hidden):
    """u, delta (b, d, L), A (d, n), B, C (b, L, n) recomputed from the submodules."""
    x, _ = mixer.in_proj(hidden).transpose(1, 2).chunk(2, dim=1)
    L = x.shape[-1]
    x = F.silu(mixer.conv1d(x)[..., :L]).transpose(1, 2)
    ts, B, C = torch.split(
        mixer.x_proj(x), [mixer.time_step_rank, mixer.state_size, mixer.state_size], dim=-1
    )
    delta = F.softplus(mixer.dt_proj(ts)).transpose(1, 2)
    return x.transpose(1, 2), delta, -torch.exp(mixer.A_log), B, C


def test_surrogate_matches_its_formulas():
    mixer = tiny_model((6,)).backbone.layers[0].mixer.double().train()
    mixer.collect_statistics = True
    hidden = [
        torch.randn(2, 7, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(i))
        for i in range(2)
    ]
    with torch.no_grad():
        for h in hidden:
            mixer(h)
        parts = [_scan_inputs(mixer, h) for h in hidden]
    u = torch.cat([p[0] for p in parts], dim=0)
    delta = torch.cat([p[1] for p in parts], dim=0)
    A = parts[0][2]
    B = torch.cat([p[3] for p in parts], dim=0)
    C = torch.cat([p[4] for p in parts], dim=0)
    abar = torch.exp(delta[..., None] * A[None, :, None, :]).mean(dim=(0, 2))  # (d, n)
    b2 = ((delta * u)[..., None] ** 2 * (B**2)[:, None]).mean(dim=(0, 2))  # (d, n)
    c2 = (C**2).mean(dim=(0, 1))  # (n,)
    sys = mixer.lti_system()
    torch.testing.assert_close(sys.A, abar, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(sys.B[..., 0], b2.sqrt(), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(sys.C[:, 0, :], c2.sqrt().expand_as(sys.C[:, 0, :]), atol=1e-6, rtol=1e-5)
    assert "28 tokens (2 forward passes)" in sys.surrogate


# ---------------------------------------------------------------------------------------------- reduce_


def test_plan_reduction_shrinks_shapes_and_config():
    model = tiny_model((8, 8))
    collect(model)
    mixer = model.backbone.layers[1].mixer
    plan = plan_reduction(mixer.lti_system(), RankPolicy(tau=0.0, mode="fixed", fixed_fraction=0.5))
    assert plan is not None and plan.rule == "modal" and plan.rank == 4
    old_a, old_x = mixer.A_log, mixer.x_proj.weight
    swaps = mixer.reduce_(plan)
    R = mixer.time_step_rank
    assert mixer.state_size == 4 and mixer.ssm_state_size == 4
    assert mixer.A_log.shape == (32, 4) and mixer.x_proj.weight.shape == (R + 8, 32)
    assert mixer.x_proj.out_features == R + 8
    assert model.config.state_sizes == [8, 4] and model.config.state_size == 8
    assert [(s.old is o, s.state_dim) for s, o in zip(swaps, (old_a, old_x))] == [(True, 1), (True, 0)]
    assert swaps[0].new is mixer.A_log and swaps[1].new is mixer.x_proj.weight
    assert isinstance(mixer.A_log, torch.nn.Parameter) and mixer.A_log.requires_grad
    keep = plan.keep
    torch.testing.assert_close(swaps[0].keep, keep)
    torch.testing.assert_close(swaps[1].keep, torch.cat([torch.arange(R), R + keep, R + 8 + keep]))
    torch.testing.assert_close(mixer.A_log, old_a[:, keep])
    torch.testing.assert_close(mixer.x_proj.weight, old_x[swaps[1].keep])
    assert mixer.statistics_tokens == 0  # stale statistics are dropped
    # still a working model: train step, cached generation
    model.train()
    x = ids()
    model(x, labels=x).loss.backward()
    assert mixer.A_log.grad.shape == (32, 4)
    model.eval()
    out = model.generate(
        x[:, :4], attention_mask=torch.ones_like(x[:, :4]), max_new_tokens=3, do_sample=False
    )
    assert out.shape == (2, 7)


def test_keeping_all_states_leaves_logits_unchanged():
    model = tiny_model((8, 4))
    x = ids()
    before = logits(model, x)
    for m in model.mixers():
        m.reduce_(modal_plan(m.state_size, torch.arange(m.state_size)))
    torch.testing.assert_close(logits(model, x), before, atol=0, rtol=0)


def test_subset_equals_model_built_small_with_sliced_weights():
    model = tiny_model((8, 4))
    sd = model.state_dict()
    keeps = [torch.tensor([0, 2, 5]), torch.tensor([1, 3])]
    for m, keep in zip(model.mixers(), keeps):
        m.reduce_(modal_plan(m.state_size, keep))
    assert model.config.state_sizes == [3, 2]
    small = tiny_model((3, 2), seed=123)
    R = small.config.time_step_rank
    sliced = dict(sd)
    for i, (n, keep) in enumerate(zip((8, 4), keeps)):
        p = f"backbone.layers.{i}.mixer."
        sliced[p + "A_log"] = sd[p + "A_log"][:, keep]
        sliced[p + "x_proj.weight"] = sd[p + "x_proj.weight"][
            torch.cat([torch.arange(R), R + keep, R + n + keep])
        ]
    small.load_state_dict(sliced)
    x = ids()
    torch.testing.assert_close(logits(model, x), logits(small, x), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize(
    ("plan", "match"),
    [
        (modal_plan(7, [0, 1]), "plan.n=7"),
        (modal_plan(8, [0, 0, 1]), "distinct"),
        (modal_plan(8, [0, 9]), "distinct"),
        (
            ReductionPlan(n=8, rank=2, hsv=torch.ones(8), energy_kept=1.0, error_bound=0.0, rule="balanced"),
            "modal",
        ),
    ],
)
def test_reduce_rejects_bad_plans_without_changes(plan, match):
    model = tiny_model((8, 4))
    mixer = model.backbone.layers[0].mixer
    a = mixer.A_log
    with pytest.raises(ValueError, match=match):
        mixer.reduce_(plan)
    assert mixer.A_log is a and mixer.state_size == 8 and model.config.state_sizes == [8, 4]


# ---------------------------------------------------------------------------------------------- resize / load


def test_resize_shrinks_and_grows():
    model = tiny_model((4, 4))
    x = ids()
    before = logits(model, x)
    mixer = model.backbone.layers[0].mixer
    mixer.resize_(6)  # grow: new states have zero B/C rows -> same function
    assert (
        mixer.A_log.shape == (32, 6) and model.config.state_sizes == [6, 4] and model.config.state_size == 6
    )
    torch.testing.assert_close(logits(model, x), before, atol=1e-6, rtol=1e-6)
    mixer.resize_(2)
    assert mixer.x_proj.weight.shape[0] == mixer.time_step_rank + 4 and model.config.state_sizes == [2, 4]
    with pytest.raises(ValueError, match="state_size must be >= 1"):
        mixer.resize_(0)


def test_compressed_state_dict_loads_into_original_size_model(tmp_path):
    model = tiny_model((8, 8))
    for m, keep in zip(model.mixers(), ([0, 3, 4], [1, 2, 5, 7])):
        m.reduce_(modal_plan(8, keep))
    x = ids()
    expected = logits(model, x)
    fresh = tiny_model((8, 8), seed=5)  # built at the original size (Trainer resume)
    result = fresh.load_state_dict(model.state_dict())
    assert not result.missing_keys and not result.unexpected_keys
    assert fresh.config.state_sizes == [3, 4]
    assert [m.state_size for m in fresh.mixers()] == [3, 4]
    torch.testing.assert_close(logits(fresh, x), expected, atol=0, rtol=0)
    # and through save_pretrained / from_pretrained (config.state_sizes drives the shapes)
    model.save_pretrained(tmp_path)
    again = CompreSSMMambaForCausalLM.from_pretrained(tmp_path).eval()
    assert again.config.state_sizes == [3, 4]
    torch.testing.assert_close(logits(again, x), expected, atol=0, rtol=0)
