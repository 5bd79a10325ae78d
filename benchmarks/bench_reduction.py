"""Time one full CompreSSM reduction of a diagonal complex (LRU-like) system on CPU, float64.

One reduction = ``plan_reduction``: Gramians -> Hankel singular values -> balanced truncation ->
re-diagonalization. The stage columns time the same stages separately (median).

    python benchmarks/bench_reduction.py                 # n in {64, 128, 256, 512}, m = p = 256
    python benchmarks/bench_reduction.py --threads 2 --repeats 5 --sizes 64 128
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch

from compressm_hf import LTISystem, RankPolicy, plan_reduction
from compressm_hf.diagonal import rediagonalize
from compressm_hf.gramians import gramians
from compressm_hf.hankel import DEFAULT_JITTER, _square_root_factors
from compressm_hf.truncation import _balance, _truncate


def lru_system(n: int, m: int, p: int, seed: int = 0) -> LTISystem:
    """LRU initialisation: |lambda| uniform on [0.9, 0.999], phase in [0, 2 pi), gamma-normalised B."""
    g = torch.Generator().manual_seed(seed)
    r = 0.9 + 0.099 * torch.rand(n, generator=g, dtype=torch.float64)
    lam = torch.polar(r, 2 * torch.pi * torch.rand(n, generator=g, dtype=torch.float64))
    B = torch.randn(n, m, generator=g, dtype=torch.complex128) / (2 * m) ** 0.5
    B = B * torch.sqrt(1 - r**2)[:, None]
    C = torch.randn(p, n, generator=g, dtype=torch.complex128) / n**0.5
    return LTISystem(A=lam, B=B, C=C)


def timed(fn, repeats: int) -> tuple[list[float], object]:
    out = fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return times, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--repeats", type=int, default=7, help="timed repeats per size (after one warm-up)")
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 128, 256, 512], help="state sizes n")
    parser.add_argument("--io", type=int, default=256, help="m = p (LRU hidden size H)")
    parser.add_argument("--fixed-fraction", type=float, default=0.5, help="fraction of states cut")
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    policy = RankPolicy(tau=0.0, mode="fixed", fixed_fraction=args.fixed_fraction)

    print(
        f"torch {torch.__version__}, {platform.processor() or platform.machine()}, "
        f"{torch.get_num_threads()} threads, m = p = {args.io}, {args.repeats} repeats, float64/complex128\n"
    )
    print("| n | r | total median (ms) | total min (ms) | Gramians | HSVs (chol+SVD) | truncation | rediag |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for n in args.sizes:
        s = lru_system(n, args.io, args.io)
        with torch.no_grad():
            times, plan = timed(lambda s=s: plan_reduction(s, policy), args.repeats)
            t_gram, (P, Q) = timed(lambda s=s: gramians(s.A, s.B, s.C), args.repeats)
            t_hsv, _ = timed(
                lambda P=P, Q=Q: torch.linalg.svd(_square_root_factors(P, Q, DEFAULT_JITTER)[2]),
                args.repeats,
            )
            bal = _balance(s.A, s.B, s.C, True, DEFAULT_JITTER)
            keep = torch.arange(plan.rank)
            t_bt, bt = timed(
                lambda s=s, bal=bal, keep=keep: _truncate(s.A, s.B, s.C, True, bal, keep), args.repeats
            )
            t_rd, _ = timed(lambda bt=bt: rediagonalize(bt.A, bt.B, bt.C), args.repeats)
        ms = [1e3 * t for t in times]
        stage = [1e3 * statistics.median(t) for t in (t_gram, t_hsv, t_bt, t_rd)]
        print(
            f"| {n} | {plan.rank} | {statistics.median(ms):.1f} | {min(ms):.1f} | "
            + " | ".join(f"{v:.1f}" for v in stage)
            + " |"
        )


if __name__ == "__main__":
    main()
