"""The chunked parallel scan agrees with the sequential reference loop (values and gradients)."""

import pytest
import torch

from compressm_hf.modeling.lru import LRUConfig, LRUMixer
from compressm_hf.modeling.lru.scan_lru import lru_scan_chunked, lru_scan_sequential


def _scan_and_grads(scan, nu, theta, inputs, initial, weights):
    log_lambda = torch.complex(-torch.exp(nu), torch.exp(theta))
    states, last = scan(log_lambda, inputs, initial)
    loss = (states * weights.conj()).real.sum() + last.abs().square().sum()
    grads = torch.autograd.grad(loss, [nu, theta, inputs] + ([initial] if initial is not None else []))
    return states.detach(), last.detach(), grads


@pytest.mark.parametrize(
    ("length", "chunk", "with_initial"),
    [(1, 4, False), (7, 16, True), (37, 4, False), (37, 4, True), (64, 8, True), (200, 3, True)],
)
def test_chunked_scan_matches_loop_complex128(length, chunk, with_initial):
    gen = torch.Generator().manual_seed(length * 10 + chunk)
    n, batch = 5, 2
    nu = torch.randn(n, dtype=torch.float64, generator=gen).requires_grad_()
    theta = torch.randn(n, dtype=torch.float64, generator=gen).requires_grad_()
    inputs = torch.randn(batch, length, n, dtype=torch.complex128, generator=gen).requires_grad_()
    initial = None
    if with_initial:
        initial = torch.randn(batch, n, dtype=torch.complex128, generator=gen).requires_grad_()
    weights = torch.randn(batch, length, n, dtype=torch.complex128, generator=gen)

    ref = _scan_and_grads(lru_scan_sequential, nu, theta, inputs, initial, weights)
    out = _scan_and_grads(
        lambda a, b, c: lru_scan_chunked(a, b, c, chunk_size=chunk), nu, theta, inputs, initial, weights
    )
    torch.testing.assert_close(out[0], ref[0], rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(out[1], ref[1], rtol=1e-10, atol=1e-10)
    for got, want in zip(out[2], ref[2]):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)


def test_chunked_scan_is_stable_for_small_eigenvalues():
    # |lambda| ~ 1e-3: powers inside a chunk only go down, nothing blows up
    n, length = 3, 50
    log_lambda = torch.complex(torch.full((n,), -7.0), torch.ones(n))
    inputs = torch.randn(1, length, n, dtype=torch.complex64)
    ref, _ = lru_scan_sequential(log_lambda, inputs)
    out, _ = lru_scan_chunked(log_lambda, inputs, chunk_size=16)
    torch.testing.assert_close(out, ref)


def test_mixer_parallel_equals_sequential_float32_with_grads():
    torch.manual_seed(0)
    outputs, grads = [], []
    for impl in ("sequential", "parallel"):
        config = LRUConfig(
            hidden_size=8, num_hidden_layers=1, state_size=6, scan_implementation=impl, scan_chunk_size=8
        )
        torch.manual_seed(1)
        mixer = LRUMixer(config, layer_idx=0)
        mixer.init_lru_weights()
        u = torch.randn(3, 45, 8, generator=torch.Generator().manual_seed(2), requires_grad=True)
        out = mixer(u)
        out.square().sum().backward()
        outputs.append(out.detach())
        grads.append([u.grad] + [p.grad for p in mixer.parameters()])
    torch.testing.assert_close(outputs[1], outputs[0], rtol=1e-4, atol=1e-5)
    for got, want in zip(grads[1], grads[0]):
        torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-4)
