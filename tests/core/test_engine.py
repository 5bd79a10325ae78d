"""compressm_hf.engine: one compression event on a model (find layers, plan, apply, check)."""

from __future__ import annotations

import math

import pytest
import torch

from compressm_hf import RankPolicy, UnstableSystemError, find_reducible_layers
from compressm_hf.engine import (
    MAX_POLE_MODULUS,
    CompressionEvent,
    LayerPlans,
    StateSizeMismatchError,
    check_pole_margin,
    check_state_sizes,
    compress_model,
    plan_layers,
    record_compression,
)

lru = pytest.importorskip("compressm_hf.modeling.lru")
mamba = pytest.importorskip("compressm_hf.modeling.mamba")

LRU_STATE_PARAMS = 7  # nu_log, theta_log, gamma_log, B_re, B_im, C_re, C_im


def lru_model(n=12, layers=2, seed=0):
    torch.manual_seed(seed)
    config = lru.LRUConfig(vocab_size=16, hidden_size=8, num_hidden_layers=layers, state_size=n)
    return lru.LRUForCausalLM(config).eval()


def mamba_model(state_sizes=(8, 8), seed=0):
    torch.manual_seed(seed)
    config = mamba.CompreSSMMambaConfig(
        vocab_size=32, hidden_size=16, num_hidden_layers=len(state_sizes), state_sizes=list(state_sizes)
    )
    model = mamba.CompreSSMMambaForCausalLM(config)
    model.train()
    model.set_collect_statistics(True)
    with torch.no_grad():
        model(torch.randint(1, 32, (2, 12), generator=torch.Generator().manual_seed(1)))
    model.set_collect_statistics(False)
    return model.eval()


def mixer(model, i):
    return find_reducible_layers(model)[i]


def test_compress_model_on_lru_returns_swaps_records_and_sizes():
    model = lru_model()
    event = compress_model(model, RankPolicy(tau=0.1))
    assert isinstance(event, CompressionEvent)
    sizes = [int(m.state_size) for m in find_reducible_layers(model)]
    assert event.sizes_before == [12, 12] and event.sizes_after == sizes == model.config.state_sizes
    assert event.layers_reduced == 2 and all(n < 12 for n in sizes)
    assert len(event.swaps) == LRU_STATE_PARAMS * event.layers_reduced
    for record, n in zip(event.layers, sizes):
        assert record["reduced"] and record["n_before"] == 12 and record["n_after"] == n
        assert record["rule"] == "balanced" and 0.9 - 1e-9 <= record["energy_kept"] <= 1.0
        assert record["hsv"].shape == (12,) and record["wall_time_s"] >= 0.0
    assert event.skipped == {} and event.budget is None
    # the reduced model still runs
    assert torch.isfinite(model(torch.randint(0, 16, (1, 5))).logits).all()


def test_compress_model_on_mamba_keeps_a_modal_subset():
    model = mamba_model()
    event = compress_model(model, RankPolicy(tau=0.2))
    assert event.sizes_before == [8, 8]
    assert (
        event.sizes_after
        == model.config.state_sizes
        == [int(m.state_size) for m in find_reducible_layers(model)]
    )
    reduced = [r for r in event.layers if r["reduced"]]
    assert reduced and all(r["rule"] == "modal" for r in reduced)
    assert event.swaps  # A_log, D-independent state params, x_proj rows ...
    for swap in event.swaps:
        assert swap[1].requires_grad == swap[0].requires_grad


def test_a_layer_that_cannot_be_reduced_is_skipped_the_others_are_cut():
    model = lru_model()
    with torch.no_grad():
        mixer(model, 0).nu_log[3] = float("nan")
    with pytest.warns(UserWarning, match=r"layer 0 skipped, its system cannot be reduced"):
        event = compress_model(model, RankPolicy(tau=0.1), step=7)
    assert set(event.skipped) == {0} and "InvalidSystemError" in event.skipped[0]
    first, second = event.layers
    assert not first["reduced"] and first["reason"].startswith("skipped: InvalidSystemError")
    assert first["n_after"] == 12 and second["reduced"]
    assert model.config.state_sizes == [12, event.sizes_after[1]]


def test_a_marginally_stable_pole_is_refused_and_skipped():
    model = lru_model()
    with torch.no_grad():  # |lambda| = exp(-exp(nu_log)) = 1 - 1e-9 passes |lambda| < 1, not the margin
        mixer(model, 1).nu_log[0] = math.log(-math.log1p(-1e-9))
    with pytest.raises(UnstableSystemError, match="marginally"):
        check_pole_margin(mixer(model, 1).lti_system())
    with pytest.warns(UserWarning, match="layer 1 skipped"):
        event = compress_model(model, RankPolicy(tau=0.1))
    assert "marginally" in event.skipped[1] and event.layers[1]["reason"].startswith("skipped: Unstable")
    assert event.layers[0]["reduced"] and event.sizes_after[1] == 12
    check_pole_margin(mixer(model, 0).lti_system())  # a healthy layer passes
    assert MAX_POLE_MODULUS < 1.0


def test_the_gate_leaves_a_layer_alone_with_a_reason():
    event = compress_model(lru_model(), RankPolicy(tau=0.0))
    assert event.layers_reduced == 0 and event.swaps == []
    assert [r["reason"] for r in event.layers] == ["gate", "gate"]


def test_given_plans_are_applied_as_planned():
    model, twin = lru_model(), lru_model()
    plans = plan_layers(find_reducible_layers(model), RankPolicy(tau=0.1, selection="random"), seed=3, step=5)
    assert isinstance(plans, LayerPlans) and set(plans.plans) == {0, 1}
    event = compress_model(model, plans=plans)
    again = compress_model(twin, RankPolicy(tau=0.1, selection="random"), seed=3, step=5)
    assert event.sizes_after == again.sizes_after
    for a, b in zip(find_reducible_layers(model), find_reducible_layers(twin)):
        torch.testing.assert_close(a.nu_log, b.nu_log, rtol=0, atol=0)
    # a plain {layer_idx: plan} (the baselines' own plans); None means "leave it"
    third = lru_model()
    plans = plan_layers(find_reducible_layers(third), RankPolicy(tau=0.1))
    event = compress_model(third, plans={0: plans.plans[0], 1: None})
    assert [r["reduced"] for r in event.layers] == [True, False]


def test_a_state_budget_shares_one_tau_and_is_met():
    model = lru_model(layers=3)
    event = compress_model(model, RankPolicy(tau=0.0), target_total=24)
    assert sum(event.sizes_after) <= 24 and event.budget["met"] is True
    assert event.budget["attempt_target"] == 24 and event.budget["total_before"] == 36
    assert 0.0 < event.budget["tau"] < 1.0
    within = compress_model(model, RankPolicy(tau=0.0), target_total=100)
    assert within.budget["within_budget"] and within.layers_reduced == 0
    assert [r["reason"] for r in within.layers] == ["budget met"] * 3


def test_a_layer_that_does_not_record_its_size_is_an_error(monkeypatch):
    model = lru_model()
    monkeypatch.setattr(type(mixer(model, 0)), "_set_state_size_in_config", lambda self, n: None)
    with pytest.raises(StateSizeMismatchError, match=r"config.state_sizes\[0\]"):
        compress_model(model, RankPolicy(tau=0.1))


def test_check_state_sizes_and_record_compression():
    model = lru_model()
    assert check_state_sizes(model) == [12, 12]
    model.config.state_sizes = [12, 11]
    with pytest.raises(StateSizeMismatchError, match="layer 1"):
        check_state_sizes(model)
    record_compression(model, {"tau": 0.1, "events": []})
    assert model.config.compression == {"tau": 0.1, "events": []}
    record_compression(torch.nn.Linear(2, 2), {"tau": 0.1})  # no config: nothing to write


def test_compress_model_needs_a_policy_or_plans():
    with pytest.raises(ValueError, match="needs a RankPolicy"):
        compress_model(lru_model())
    with pytest.raises(TypeError, match="RankPolicy"):
        plan_layers(find_reducible_layers(lru_model()), {"tau": 0.1})
