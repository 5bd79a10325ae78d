"""Shared helpers of the benchmark scripts (run as `python benchmarks/<script>.py`, so this imports as `_timing`)."""

from __future__ import annotations

import time

import torch

FLAG = "\u2021"  # marks a row measured while the contention probe read low


def probe() -> float:
    """GFLOP/s of a 512^3 fp32 matmul (best of 3): a quick reading of how contended the CPU is right now."""
    a = torch.randn(512, 512)
    b = torch.randn(512, 512)
    best = float("inf")
    for _ in range(3):
        t = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t)
    return 2 * 512**3 / best / 1e9
