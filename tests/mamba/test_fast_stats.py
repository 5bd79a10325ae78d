"""Mamba surrogate statistics fused into the C++ scan: equal to the torch reference, same kept states.

The fused forward sums ``1 - exp(dt*A)`` and ``(dt*u)^2 B^2`` while it computes ``exp(dt*A)`` for the
scan anyway (``compressm_hf.kernels.selective_scan_cpu(..., moments=True)``);
``scan_mamba.surrogate_moments_ref`` is the pure-torch reference it must equal. Skipped (with the
compiler's reason) where the kernel cannot be built.
"""

from __future__ import annotations

import pytest
import torch

from compressm_hf import RankPolicy, find_reducible_layers, plan_reduction
from compressm_hf.modeling.mamba import CompreSSMMambaConfig, CompreSSMMambaForCausalLM
from compressm_hf.modeling.mamba import scan_mamba as scan

RTOL = 1e-5


@pytest.fixture(scope="module")
def cpp():
    from compressm_hf import kernels

    if not kernels.is_available():
        pytest.skip(f"C++ selective-scan kernel could not be built here: {kernels.build_error()}")
    return kernels


def scan_inputs(batch, d, L, n, seed=0, tiny_dt=False):
    g = torch.Generator().manual_seed(seed)
    delta = torch.randn(batch, d, L, generator=g) - (9.0 if tiny_dt else 1.5)  # softplus: 1e-4 .. 1.5
    return {
        "u": torch.randn(batch, d, L, generator=g),
        "delta": delta,
        "A": -torch.exp(torch.randn(d, n, generator=g) * 0.7),
        "B": torch.randn(batch, n, L, generator=g),
        "C": torch.randn(batch, n, L, generator=g),
        "D": torch.randn(d, generator=g),
        "z": torch.randn(batch, d, L, generator=g),
        "delta_bias": torch.randn(d, generator=g) * 0.5,
    }


def assert_close(got, ref, name):
    assert got.dtype == torch.float64 and got.shape == ref.shape, name
    err = (got - ref).abs().max().item()
    scale = ref.abs().max().item()
    assert err <= RTOL * scale, f"{name}: max error {err:.3g} vs scale {scale:.3g}"


# (batch, d, L, n): d not a multiple of 16, odd n, n < 16, L longer than one chunk (64)
CASES = [(2, 37, 150, 5), (1, 16, 7, 1), (3, 48, 65, 16)]


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("masked", [False, True])
def test_fused_moments_equal_reference(cpp, case, masked):
    batch, d, L, n = case
    x = scan_inputs(batch, d, L, n)
    w = None
    if masked:
        w = (torch.rand(batch, L, generator=torch.Generator().manual_seed(3)) > 0.3).float()
    moments = scan.ScanMoments(w)
    y = scan.selective_scan(**x, delta_softplus=True, impl="cpp", moments=moments)
    assert moments.source == "fused"
    om_ref, ie_ref = scan.surrogate_moments_ref(x["u"], x["delta"], x["A"], x["B"], x["delta_bias"], True, w)
    assert_close(moments.one_minus_decay, om_ref, "one_minus_decay")
    assert_close(moments.input_energy, ie_ref, "input_energy")
    # collecting moments changes neither the output nor the gradients
    torch.testing.assert_close(y, scan.selective_scan(**x, delta_softplus=True, impl="cpp"), rtol=0, atol=0)


def test_fused_moments_accurate_for_tiny_steps(cpp):
    """dt*A ~ 1e-4: 1 - exp(dt*A) in float32 would lose digits; the kernel uses the series there."""
    x = scan_inputs(2, 16, 40, 4, tiny_dt=True)
    moments = scan.ScanMoments()
    scan.selective_scan(**x, delta_softplus=True, impl="cpp", moments=moments)
    om64, _ = scan.surrogate_moments_ref(
        *(x[k].double() for k in ("u", "delta", "A", "B", "delta_bias")), True, None
    )
    rel = ((moments.one_minus_decay - om64).abs() / om64).max().item()
    assert rel < 1e-4, rel


def test_fused_moments_keep_gradients_and_last_state(cpp):
    x = scan_inputs(2, 20, 70, 3)
    leaves = {k: v.clone().requires_grad_(True) for k, v in x.items()}
    y, last = scan.selective_scan(**leaves, delta_softplus=True, return_last_state=True, impl="cpp")
    (y.square().sum() + last.sum()).backward()
    ref = {k: v.grad.clone() for k, v in leaves.items()}
    leaves = {k: v.clone().requires_grad_(True) for k, v in x.items()}
    moments = scan.ScanMoments()
    y2, last2 = scan.selective_scan(
        **leaves, delta_softplus=True, return_last_state=True, impl="cpp", moments=moments
    )
    (y2.square().sum() + last2.sum()).backward()
    torch.testing.assert_close(y2, y, rtol=0, atol=0)
    torch.testing.assert_close(last2, last, rtol=0, atol=0)
    for k, g in ref.items():
        torch.testing.assert_close(leaves[k].grad, g, rtol=0, atol=0, msg=k)


def test_chunked_path_fills_moments_with_the_reference():
    x = scan_inputs(1, 8, 12, 3)
    moments = scan.ScanMoments()
    scan.selective_scan(**x, delta_softplus=True, impl="chunked", moments=moments)
    assert moments.source == "reference"
    om_ref, ie_ref = scan.surrogate_moments_ref(x["u"], x["delta"], x["A"], x["B"], x["delta_bias"], True)
    torch.testing.assert_close(moments.one_minus_decay, om_ref, rtol=0, atol=0)
    torch.testing.assert_close(moments.input_energy, ie_ref, rtol=0, atol=0)


def test_bad_moment_weights_raise(cpp):
    x = scan_inputs(2, 16, 10, 2)
    with pytest.raises(ValueError, match=r"moment_weights must have shape \(batch, L\)"):
        cpp.selective_scan_cpu(**x, delta_softplus=True, moments=True, moment_weights=torch.ones(2, 9))


def _model_with_separated_states():
    """Two layers of 8 states where states 0-2 remember far longer (A ~ -0.01) than 3-7 (A ~ -8)."""
    torch.manual_seed(0)
    cfg = CompreSSMMambaConfig(vocab_size=64, hidden_size=16, num_hidden_layers=2, state_sizes=[8, 8])
    model = CompreSSMMambaForCausalLM(cfg)
    for layer in find_reducible_layers(model):
        with torch.no_grad():
            a = torch.full_like(layer.A_log, 8.0)
            a[:, :3] = 0.01
            layer.A_log.copy_(a.log())
    return model


def _kept_states(model, impl, monkeypatch):
    monkeypatch.setenv("COMPRESSM_SCAN_IMPL", impl)
    model.train()
    model.set_collect_statistics(True)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for _ in range(2):
            model(torch.randint(1, 64, (2, 24), generator=g))
    model.set_collect_statistics(False)
    kept, systems = [], []
    for layer in find_reducible_layers(model):
        system = layer.lti_system()
        plan = plan_reduction(system, RankPolicy(tau=0.0, mode="fixed", fixed_fraction=0.625))
        kept.append(sorted(plan.keep.tolist()))
        systems.append(system)
        layer.reset_statistics()
    return kept, systems


def test_fused_statistics_keep_the_same_states(cpp, monkeypatch):
    model = _model_with_separated_states()
    kept_fused, fused = _kept_states(model, "cpp", monkeypatch)
    kept_ref, ref = _kept_states(model, "chunked", monkeypatch)
    assert kept_fused == kept_ref == [[0, 1, 2], [0, 1, 2]]
    for a, b in zip(fused, ref):
        torch.testing.assert_close(a.A, b.A, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(a.B, b.B, rtol=1e-4, atol=1e-7)
        torch.testing.assert_close(a.C, b.C, rtol=1e-5, atol=1e-7)
