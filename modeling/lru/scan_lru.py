# Copyright 2026 The compressm-hf developers.
#
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at
#
#     http://www.apache.org/licenses/LICENSE-2.0
#
# Unless required by applicable law or agreed to in writing, software
# distributed under the License is distributed on an "AS IS" BASIS,
# WITHOUT WARRANTIES OR CONDITIONS OF ANY KIND, either express or implied.
# See the License for the specific language governing permissions and
# limitations under the License.
"""Linear scans of the diagonal complex recurrence ``x[t] = lambda * x[t-1] + v[t]`` (pure PyTorch).

Both functions take the eigenvalues in log form, ``log_lambda = -exp(nu_log) + i * exp(theta_log)``, so that
powers ``lambda**k = exp(k * log_lambda)`` are exact and differentiable, and return every state together with
the last one (the state a cache carries to the next call).

* :func:`lru_scan_sequential` -- the reference loop, one step per time step (also the decoding step).
* :func:`lru_scan_chunked` -- the training path. The sequence is cut into chunks of ``T`` steps. Inside a chunk
  the states are one batched matmul with the lower-triangular Toeplitz matrix ``lambda**(t - s)`` (only
  non-negative powers, so it is stable for every ``|lambda| < 1``); the states at the chunk boundaries follow
  the same recurrence with ``lambda**T`` and are scanned recursively, which keeps the depth logarithmic in
  the length and the memory ``O(batch * length * n + n * T**2)``.

This file imports only torch: it is copied next to saved models for ``trust_remote_code`` loading.
"""

from __future__ import annotations

import torch


def lru_scan_sequential(
    log_lambda: torch.Tensor, inputs: torch.Tensor, initial_state: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference loop for ``x[t] = lambda * x[t-1] + inputs[t]``.

    Args:
        log_lambda: ``(n,)`` complex, ``log(lambda)``.
        inputs: ``(batch, length, n)`` complex, the already projected inputs ``B u[t]``.
        initial_state: ``(batch, n)`` complex state before the first step, zeros when ``None``.

    Returns:
        ``(states, last_state)``: ``(batch, length, n)`` every state and ``(batch, n)`` the last one.
    """
    batch, length, n = inputs.shape
    lam = torch.exp(log_lambda)
    state = initial_state
    if state is None:
        state = torch.zeros(batch, n, dtype=inputs.dtype, device=inputs.device)
    states = []
    for t in range(length):
        state = lam * state + inputs[:, t]
        states.append(state)
    if not states:
        return inputs, state
    return torch.stack(states, dim=1), state


def lru_scan_chunked(
    log_lambda: torch.Tensor,
    inputs: torch.Tensor,
    initial_state: torch.Tensor | None = None,
    chunk_size: int = 64,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Chunked parallel scan; same contract and results as :func:`lru_scan_sequential`.

    Args:
        log_lambda: ``(n,)`` complex, ``log(lambda)``.
        inputs: ``(batch, length, n)`` complex.
        initial_state: ``(batch, n)`` complex, zeros when ``None``.
        chunk_size: steps per chunk ``T``; the work inside a chunk is ``O(T)`` per step, the number of
            sequential levels ``O(log_T(length))``.

    Returns:
        ``(states, last_state)`` as in :func:`lru_scan_sequential`.
    """
    batch, length, n = inputs.shape
    if length == 0:
        return lru_scan_sequential(log_lambda, inputs, initial_state)
    chunk = max(1, min(int(chunk_size), length))
    if chunk == 1:
        return lru_scan_sequential(log_lambda, inputs, initial_state)
    pad = (-length) % chunk
    if pad:
        inputs = torch.cat([inputs, inputs.new_zeros(batch, pad, n)], dim=1)
    num_chunks = inputs.shape[1] // chunk

    steps = torch.arange(chunk, device=inputs.device, dtype=log_lambda.real.dtype)
    # lambda**k for k = 0 .. T, shape (T + 1, n)
    powers = torch.exp(torch.cat([steps, steps.new_full((1,), chunk)])[:, None] * log_lambda[None, :])
    lag = torch.arange(chunk, device=inputs.device)
    lag = lag[:, None] - lag[None, :]  # (T, T): t - s
    # toeplitz[j, t, s] = lambda_j**(t - s) for t >= s, else 0
    toeplitz = powers[lag.clamp(min=0)].permute(2, 0, 1) * (lag >= 0).to(powers.real.dtype)

    # states inside each chunk from a zero start: (n, T, T) @ (n, T, batch * chunks)
    blocks = (
        inputs.view(batch, num_chunks, chunk, n).permute(3, 2, 0, 1).reshape(n, chunk, batch * num_chunks)
    )
    local = torch.bmm(toeplitz, blocks).view(n, chunk, batch, num_chunks).permute(2, 3, 1, 0)  # (b, C, T, n)

    # state entering each chunk: s[0] = initial, s[c + 1] = lambda**T * s[c] + local[c, T - 1]
    if num_chunks > 1:
        ends, _ = lru_scan_chunked(
            log_lambda * chunk, local[:, :-1, -1, :], initial_state=initial_state, chunk_size=chunk_size
        )
        if initial_state is None:
            carries = torch.cat([ends.new_zeros(batch, 1, n), ends], dim=1)
        else:
            carries = torch.cat([initial_state[:, None, :], ends], dim=1)
    elif initial_state is not None:
        carries = initial_state[:, None, :]
    else:
        carries = None

    states = local
    if carries is not None:
        states = local + carries[:, :, None, :] * powers[1:][None, None, :, :]
    states = states.reshape(batch, num_chunks * chunk, n)[:, :length]
    return states, states[:, -1]
