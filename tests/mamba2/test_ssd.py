"""The chunked SSD scan and its recurrent step against a plain token-by-token loop (float64 reference)."""

from __future__ import annotations

import pytest
import torch

from compressm_hf.modeling.mamba2.ssd_mamba2 import discretize_dt, ssd_chunk_scan, ssd_state_update


def reference_loop(x, dt, A, B, C, D=None, initial_state=None):
    """``state_t = exp(dt_t A) state_{t-1} + dt_t x_t B_t^T``, ``y_t = state_t C_t + D x_t``, one token at a time.

    ``x`` ``(b, L, h, p)``, ``dt`` ``(b, L, h)``, ``A`` ``(h,)``, ``B``/``C`` ``(b, L, g, n)``; float64.
    """
    b, L, h, p = x.shape
    g, n = B.shape[-2:]
    heads_per_group = h // g
    x, dt, A, B, C = (t.double() for t in (x, dt, A, B, C))
    state = torch.zeros(b, h, p, n, dtype=torch.float64) if initial_state is None else initial_state.double()
    ys = []
    for t in range(L):
        heads = []
        for head in range(h):
            grp = head // heads_per_group
            decay = torch.exp(dt[:, t, head] * A[head])[:, None, None]
            drive = (dt[:, t, head, None] * x[:, t, head])[:, :, None] * B[:, t, grp][:, None, :]
            heads.append(decay * state[:, head] + drive)
        state = torch.stack(heads, dim=1)  # a new tensor every step: the loop stays differentiable
        y = torch.stack([state[:, hd] @ C[:, t, hd // heads_per_group, :, None] for hd in range(h)], dim=1)[
            ..., 0
        ]
        if D is not None:
            y = y + D.double()[:, None] * x[:, t]
        ys.append(y)
    return torch.stack(ys, dim=1), state


def problem(b=2, L=11, h=4, p=3, g=2, n=5, seed=0, requires_grad=False):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(b, L, h, p, generator=gen)
    dt = discretize_dt(torch.randn(b, L, h, generator=gen), torch.randn(h, generator=gen))
    A = -(torch.rand(h, generator=gen) + 0.1)
    B = torch.randn(b, L, g, n, generator=gen)
    C = torch.randn(b, L, g, n, generator=gen)
    D = torch.randn(h, generator=gen)
    init = torch.randn(b, h, p, n, generator=gen)
    tensors = [x, dt, A, B, C, D, init]
    if requires_grad:
        for t in tensors:
            t.requires_grad_(True)
    return tensors


@pytest.mark.parametrize("chunk_size", [1, 3, 4, 11, 64])
@pytest.mark.parametrize("groups", [1, 2, 4])
def test_chunked_scan_equals_loop(chunk_size, groups):
    x, dt, A, B, C, D, init = problem(g=groups)
    y, final = ssd_chunk_scan(x, dt, A, B, C, chunk_size, D=D, initial_state=init, return_final_state=True)
    y_ref, final_ref = reference_loop(x, dt, A, B, C, D, init)
    torch.testing.assert_close(y.double(), y_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(final.double(), final_ref, atol=1e-5, rtol=1e-5)
    # without an initial state and without D
    y0 = ssd_chunk_scan(x, dt, A, B, C, chunk_size)
    torch.testing.assert_close(y0.double(), reference_loop(x, dt, A, B, C)[0], atol=1e-5, rtol=1e-5)


def test_recurrent_step_equals_loop():
    x, dt, A, B, C, D, init = problem()
    state = init.clone()
    ys = [ssd_state_update(state, x[:, t], dt[:, t], A, B[:, t], C[:, t], D) for t in range(x.shape[1])]
    y_ref, final_ref = reference_loop(x, dt, A, B, C, D, init)
    torch.testing.assert_close(torch.stack(ys, dim=1).double(), y_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(state.double(), final_ref, atol=1e-5, rtol=1e-5)


def test_chunked_scan_gradients_equal_loop():
    inputs = problem(L=9, requires_grad=True)
    x, dt, A, B, C, D, init = inputs
    weight = torch.randn(2, 9, 4, 3, generator=torch.Generator().manual_seed(3))
    y, final = ssd_chunk_scan(x, dt, A, B, C, 4, D=D, initial_state=init, return_final_state=True)
    ((y * weight).sum() + final.sum()).backward()
    grads = [t.grad.clone() for t in inputs]
    for t in inputs:
        t.grad = None
    y_ref, final_ref = reference_loop(x, dt, A, B, C, D, init)
    ((y_ref * weight.double()).sum() + final_ref.sum()).backward()
    for name, got, t in zip(["x", "dt", "A", "B", "C", "D", "init"], grads, inputs):
        torch.testing.assert_close(got.double(), t.grad.double(), atol=1e-4, rtol=1e-4, msg=name)


def test_equals_transformers_torch_path():
    # same semantics as transformers' own chunked scan (dt bias + softplus applied by discretize_dt)
    from transformers.models.mamba2 import modeling_mamba2 as stock

    gen = torch.Generator().manual_seed(4)
    x, raw_dt = torch.randn(2, 10, 4, 3, generator=gen), torch.randn(2, 10, 4, generator=gen)
    bias, A = torch.randn(4, generator=gen), -(torch.rand(4, generator=gen) + 0.1)
    B, C, D = torch.randn(2, 10, 2, 5, generator=gen), torch.randn(2, 10, 2, 5, generator=gen), torch.randn(4)
    theirs = stock.mamba2_chunk_scan(x, raw_dt, A, B, C, chunk_size=4, D=D, dt_bias=bias, dt_softplus=True)
    ours = ssd_chunk_scan(x, discretize_dt(raw_dt, bias), A, B, C, 4, D=D)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


def test_bad_arguments_are_named():
    x, dt, A, B, C, *_ = problem()
    with pytest.raises(ValueError, match="chunk_size must be >= 1, got 0"):
        ssd_chunk_scan(x, dt, A, B, C, 0)
    with pytest.raises(ValueError, match=r"heads \(4\) must be a multiple of the number of groups \(3\)"):
        ssd_chunk_scan(x, dt, A, torch.randn(2, 11, 3, 5), torch.randn(2, 11, 3, 5), 4)
