"""The fused channels-last causal conv1d + SiLU (C++) against the reference ``ops_mamba.causal_conv1d_fn``.

Values and gradients (input, weight, bias) are compared with the reference run in float64; the kernel
computes in float32. Skipped (with the compiler's reason) where the kernel cannot be built.
"""

from __future__ import annotations

import pytest
import torch

from compressm_hf.modeling.mamba import CompreSSMMambaConfig, CompreSSMMambaForCausalLM, ops_mamba

TOL = 1e-5


@pytest.fixture(scope="module")
def cpp():
    from compressm_hf import kernels

    if not kernels.is_available():
        pytest.skip(f"C++ kernels could not be built here: {kernels.build_error()}")
    return kernels


def _reference(x_cl, weight, bias, activation):
    return ops_mamba.causal_conv1d_fn(x_cl.transpose(1, 2), weight, bias, activation).transpose(1, 2)


# (batch, L, d, K): d not a multiple of 16, L shorter than the kernel, K = 1
@pytest.mark.parametrize("case", [(2, 9, 37, 4), (1, 2, 16, 4), (3, 20, 5, 2), (1, 6, 18, 1)])
@pytest.mark.parametrize("activation", [None, "silu"])
@pytest.mark.parametrize("with_bias", [True, False])
def test_values_and_gradients_match_reference(cpp, case, activation, with_bias):
    batch, L, d, K = case
    g = torch.Generator().manual_seed(0)
    proj = torch.randn(batch, L, 2 * d, generator=g, dtype=torch.float64)  # x is a strided view, as in Mamba
    weight = torch.randn(d, K, generator=g, dtype=torch.float64)
    bias = torch.randn(d, generator=g, dtype=torch.float64) if with_bias else None
    gy = torch.randn(batch, L, d, generator=g, dtype=torch.float64)

    def run(fn, dtype):
        leaves = [
            t.to(dtype).clone().requires_grad_(True) for t in (proj, weight) + ((bias,) if with_bias else ())
        ]
        y = fn(leaves[0][..., :d], leaves[1], leaves[2] if with_bias else None, activation)
        (y * gy.to(dtype)).sum().backward()
        return [y] + [t.grad for t in leaves]

    ref = run(_reference, torch.float64)
    got = run(cpp.causal_conv1d_cpu, torch.float32)
    for name, a, b in zip(("y", "x", "weight", "bias"), got, ref):
        assert a.dtype == torch.float32 and a.shape == b.shape, name
        err = (a.double() - b).abs().max().item()
        assert err <= TOL * max(1.0, b.abs().max().item()), f"{name}: {err:.3g}"


def test_bad_arguments_raise(cpp):
    x = torch.randn(1, 4, 8)
    with pytest.raises(ValueError, match="activation must be None, 'silu' or 'swish'"):
        cpp.causal_conv1d_cpu(x, torch.randn(8, 4), None, "relu")
    with pytest.raises(ValueError, match=r"weight \(d, K\)"):
        cpp.causal_conv1d_cpu(x, torch.randn(7, 4))


def test_mamba_step_equals_the_torch_conv_path(cpp, monkeypatch):
    """The model's CPU forward (fused conv, channels-last dt) gives the logits and gradients of the
    reference conv path (COMPRESSM_CONV_IMPL=torch)."""
    torch.manual_seed(0)
    cfg = CompreSSMMambaConfig(vocab_size=64, hidden_size=16, num_hidden_layers=2, state_sizes=[8, 5])
    model = CompreSSMMambaForCausalLM(cfg).train()
    ids = torch.randint(1, 64, (2, 19), generator=torch.Generator().manual_seed(1))

    def loss_and_grads():
        model.zero_grad()
        out = model(ids, labels=ids)
        out.loss.backward()
        return out.logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    logits, grads = loss_and_grads()
    monkeypatch.setenv("COMPRESSM_CONV_IMPL", "torch")
    ref_logits, ref_grads = loss_and_grads()
    torch.testing.assert_close(logits, ref_logits, rtol=1e-5, atol=1e-5)
    for name, g in ref_grads.items():
        torch.testing.assert_close(grads[name], g, rtol=1e-4, atol=1e-6, msg=name)
