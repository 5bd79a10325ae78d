"""The fast SSD scan (``ssd_chunk_scan``) against the straightforward chunked one (``ssd_chunk_scan_reference``),
values and gradients, and the mixer's fused C++ causal conv against the torch conv (``COMPRESSM_CONV_IMPL=torch``)."""

from __future__ import annotations

import pytest
import torch

from compressm_hf.modeling.mamba2.ssd_mamba2 import (
    SCAN_BLOCK,
    discretize_dt,
    scan_block,
    ssd_chunk_scan,
    ssd_chunk_scan_reference,
)


def _problem(b=2, L=37, h=4, p=3, g=2, n=6, seed=0, decay_scale=1.0, zero_dt_tail=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(b, L, h, p, generator=gen)
    dt = discretize_dt(torch.randn(b, L, h, generator=gen), torch.randn(h, generator=gen))
    if zero_dt_tail:  # padding: a zero step leaves the state as it is
        dt[:, -zero_dt_tail:] = 0.0
    A = -(torch.rand(h, generator=gen) + 0.1) * decay_scale
    B = torch.randn(b, L, g, n, generator=gen)
    C = torch.randn(b, L, g, n, generator=gen)
    D = torch.randn(h, generator=gen)
    init = torch.randn(b, h, p, n, generator=gen)
    return [t.requires_grad_(True) for t in (x, dt, A, B, C, D, init)]


def _run(scan, tensors, chunk_size):
    x, dt, A, B, C, D, init = tensors
    y, final = scan(x, dt, A, B, C, chunk_size, D=D, initial_state=init, return_final_state=True)
    gen = torch.Generator().manual_seed(1)
    loss = (y * torch.randn(y.shape, generator=gen)).sum() + (final * torch.randn(final.shape, generator=gen)).sum()
    grads = torch.autograd.grad(loss, tensors)
    return y.detach(), final.detach(), grads


@pytest.mark.parametrize(
    "case",
    [
        dict(chunk_size=8, g=1),
        dict(chunk_size=8, g=2),
        dict(chunk_size=5, g=4, L=23),  # L not a multiple of the chunk
        dict(chunk_size=64, g=2, L=37),  # one chunk longer than the sequence
        dict(chunk_size=16, g=2, L=70, decay_scale=20.0),  # strong decay: exp(cumsum) underflows inside a chunk
        dict(chunk_size=16, g=1, L=40, zero_dt_tail=9),  # padded tail
    ],
    ids=["g1", "g2", "ragged", "long-chunk", "strong-decay", "padded"],
)
def test_fast_scan_equals_reference_values_and_gradients(case):
    case = dict(case)
    chunk_size = case.pop("chunk_size")
    tensors = _problem(**case)
    y, final, grads = _run(ssd_chunk_scan, tensors, chunk_size)
    y_ref, final_ref, grads_ref = _run(ssd_chunk_scan_reference, tensors, chunk_size)
    assert torch.isfinite(y).all() and all(torch.isfinite(gr).all() for gr in grads)
    torch.testing.assert_close(y, y_ref, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(final, final_ref, atol=2e-5, rtol=1e-4)
    for name, gr, gr_ref in zip(("x", "dt", "A", "B", "C", "D", "init"), grads, grads_ref):
        torch.testing.assert_close(gr, gr_ref, atol=5e-4, rtol=1e-3, msg=lambda m, name=name: f"grad of {name}: {m}")


def test_scan_block_caps_the_chunk_and_keeps_smaller_ones():
    assert scan_block(256) == SCAN_BLOCK == 64
    assert scan_block(16) == 16
    assert scan_block(1) == 1


def test_the_mixer_fused_conv_equals_the_torch_conv(monkeypatch):
    from compressm_hf import kernels
    from compressm_hf.modeling.mamba2 import CompreSSMMamba2Config, CompreSSMMamba2ForCausalLM

    if not kernels.is_available():
        pytest.skip("the C++ kernels did not build on this machine (the torch conv is then the only path)")
    torch.manual_seed(0)
    config = CompreSSMMamba2Config(
        vocab_size=64, hidden_size=16, num_heads=4, head_dim=8, n_groups=2, num_hidden_layers=2,
        state_sizes=[6, 4], chunk_size=8, eos_token_id=None,
    )  # fmt: skip
    model = CompreSSMMamba2ForCausalLM(config)
    ids = torch.randint(1, 64, (2, 19))

    def loss_and_grads():
        model.zero_grad()
        out = model(ids, labels=ids)
        out.loss.backward()
        return out.logits.detach(), {k: p.grad.clone() for k, p in model.named_parameters()}

    monkeypatch.delenv("COMPRESSM_CONV_IMPL", raising=False)
    logits, grads = loss_and_grads()
    monkeypatch.setenv("COMPRESSM_CONV_IMPL", "torch")
    logits_ref, grads_ref = loss_and_grads()
    torch.testing.assert_close(logits, logits_ref, atol=1e-5, rtol=1e-5)
    for name in grads_ref:
        torch.testing.assert_close(grads[name], grads_ref[name], atol=1e-5, rtol=1e-4, msg=lambda m, n=name: f"{n}: {m}")
