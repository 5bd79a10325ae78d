"""Mamba-1 selective scan on the CPU: scan-only and full training-step timings.

Sections (markdown tables on stdout, all measured in this one run):

1. scan only, fwd+bwd, batch 8: ``ref`` (plain loop) vs ``chunked`` (pure torch) vs ``cpp`` (fused C++);
2. training step of a 4-layer Mamba LM (batch 8, vocab 256) at (hidden 128, seq 256) and (hidden 256,
   seq 1024), d_state in {16, 64, 128}: our scan vs transformers' own ``MambaForCausalLM`` CPU path;
3. ``null``: the same step with the scan replaced by a no-op that keeps every gradient path (the cost
   of everything but the scan);
4. step time vs d_state in {4, 8, 16, 32, 64, 128}, with a fit t = a + b * N.

"Our step" is transformers' ``MambaForCausalLM`` with ``modeling_mamba.mamba_selective_scan`` replaced
by ``scan_mamba.selective_scan`` (same model, same weights: only the scan differs). ``--model
compressm`` uses ``compressm_hf.modeling.mamba.CompreSSMMambaForCausalLM`` instead (its own dispatch).

transformers' path is O(L^2 N) in its backward (36 s/step at h128/L256/N16, minutes beyond): it runs
only where ``--hf`` allows (default: h128/L256/N16, one repetition); other cells say "not run".

Noise: the machine may be shared. After every repetition a 512^3 matmul probe (GFLOP/s at the same
thread count) is recorded; rows whose probe fell below 50 GFLOP/s per thread are flagged with a double
dagger: read their min. Under load from other jobs, --threads 1 is far more stable than 2.

    python benchmarks/bench_mamba_scan.py            # full run (~10 min on 2 cores)
    python benchmarks/bench_mamba_scan.py --quick    # fewer shapes and repetitions
"""

from __future__ import annotations

import argparse
import gc
import math
import statistics
import sys
import time
from pathlib import Path

import torch
from _timing import FLAG, probe

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "modeling" / "mamba"))
import scan_mamba  # noqa: E402  (the file itself: works with or without compressm_hf installed)

PROBE_OK = 100.0  # GFLOP/s of the 512^3 probe below which a row is flagged (set to 50 * threads)


def timed(fn, reps, warmup):
    for _ in range(warmup):
        fn()
    times, probes = [], []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
        probes.append(probe())
    return {"median": statistics.median(times), "min": min(times), "n": reps, "probes": probes}


def fmt(r, digits=3):
    if r is None:
        return "not run"
    if isinstance(r, str):
        return r
    flag = f" {FLAG}" if min(r["probes"]) < PROBE_OK else ""
    return f"{r['median']:.{digits}g} [{r['min']:.{digits}g}]{flag}"


def probes_str(*rs):
    ps = [p for r in rs if isinstance(r, dict) for p in r["probes"]]
    return f"{min(ps):.0f}-{max(ps):.0f}" if ps else "-"


# ---------------------------------------------------------------------------------------------------
# scan implementations under test
# ---------------------------------------------------------------------------------------------------
def null_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False, **kw):
    """Not a scan: same inputs, outputs and gradient paths as the scan, at ~zero cost."""
    dt = delta if delta_bias is None else delta + delta_bias[..., None]
    y = u * dt + (B.sum(1, keepdim=True) + C.sum(1, keepdim=True)) * A.sum() * 1e-3
    if D is not None:
        y = y + u * D[..., None]
    if z is not None:
        y = y * torch.nn.functional.silu(z)
    if kw.get("return_last_state"):
        return y, u.new_zeros(u.shape[0], u.shape[1], A.shape[-1])
    return y


def make_scan(impl):
    if impl == "null":
        return null_scan

    def fn(
        u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False, return_last_state=False, **_
    ):
        return scan_mamba.selective_scan(
            u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state, impl=impl
        )

    return fn


# ---------------------------------------------------------------------------------------------------
# 1. scan only
# ---------------------------------------------------------------------------------------------------
def scan_inputs(batch, d, L, n, seed=0):
    """Layouts as Mamba's mixer passes them: u and z are views of (batch, L, d) tensors, delta is
    (batch, d, L) contiguous, B and C are views of (batch, L, n)."""
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(batch, L, d, generator=g).transpose(1, 2)
    z = torch.randn(batch, L, d, generator=g).transpose(1, 2)
    delta = torch.randn(batch, d, L, generator=g) - 2.0
    A = -torch.exp(torch.randn(d, n, generator=g) * 0.5)
    B = torch.randn(batch, L, n, generator=g).transpose(1, 2)
    C = torch.randn(batch, L, n, generator=g).transpose(1, 2)
    D = torch.randn(d, generator=g)
    bias = torch.randn(d, generator=g) * 0.1
    xs = [u, delta, A, B, C, D, z, bias]
    return [x.requires_grad_() for x in xs]


def bench_scan(impl, batch, d, L, n, reps, warmup):
    xs = scan_inputs(batch, d, L, n)
    fn = make_scan(impl)

    def step():
        for x in xs:
            x.grad = None
        y = fn(*xs, delta_softplus=True)
        y.backward(torch.ones_like(y))

    return timed(step, reps, warmup)


# ---------------------------------------------------------------------------------------------------
# 2-4. training step
# ---------------------------------------------------------------------------------------------------
def build_model(kind, hidden, n, seed=0):
    torch.manual_seed(seed)
    if kind == "compressm":
        from compressm_hf.modeling.mamba import CompreSSMMambaConfig, CompreSSMMambaForCausalLM

        cfg = CompreSSMMambaConfig(
            vocab_size=256,
            hidden_size=hidden,
            state_size=n,
            num_hidden_layers=4,
            expand=2,
            conv_kernel=4,
            use_cache=False,
            tie_word_embeddings=True,
        )
        return CompreSSMMambaForCausalLM(cfg)
    from transformers import MambaConfig, MambaForCausalLM

    cfg = MambaConfig(
        vocab_size=256,
        hidden_size=hidden,
        state_size=n,
        num_hidden_layers=4,
        expand=2,
        conv_kernel=4,
        time_step_rank=math.ceil(hidden / 16),
        use_cache=False,
        tie_word_embeddings=True,
    )
    return MambaForCausalLM(cfg)


class patched_scan:
    """Swap transformers' Mamba-1 torch scan for ours (or leave it for impl='hf')."""

    def __init__(self, impl):
        self.impl = impl

    def __enter__(self):
        from transformers.models.mamba import modeling_mamba

        self.mod = modeling_mamba
        self.orig = modeling_mamba.mamba_selective_scan
        if self.impl != "hf":
            modeling_mamba.mamba_selective_scan = make_scan(self.impl)
        return self

    def __exit__(self, *exc):
        self.mod.mamba_selective_scan = self.orig


def bench_step(impl, hidden, L, n, reps, warmup, model_kind="hf-patched", batch=8):
    kind = "compressm" if (model_kind == "compressm" and impl != "hf") else "hf"
    model = build_model(kind, hidden, n)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ids = torch.randint(0, 256, (batch, L), generator=torch.Generator().manual_seed(1))
    calls = {"n": 0}

    def step():
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        calls["n"] += 1

    if kind == "compressm":
        import os

        old = os.environ.get("COMPRESSM_SCAN_IMPL")
        if impl == "null":
            from compressm_hf.modeling.mamba import modeling_compressm_mamba as mcm

            orig = mcm.selective_scan
            mcm.selective_scan = null_scan
            try:
                return timed(step, reps, warmup)
            finally:
                mcm.selective_scan = orig
        os.environ["COMPRESSM_SCAN_IMPL"] = impl
        try:
            return timed(step, reps, warmup)
        finally:
            if old is None:
                os.environ.pop("COMPRESSM_SCAN_IMPL", None)
            else:
                os.environ["COMPRESSM_SCAN_IMPL"] = old
    with patched_scan(impl):
        r = timed(step, reps, warmup)
    gc.collect()
    return r


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="fewer shapes and repetitions")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--reps", type=int, default=None)
    p.add_argument(
        "--hf",
        default="128x256x16",
        help="comma-separated HIDDENxSEQxN cells where transformers' own path is timed (1 rep); 'none'",
    )
    p.add_argument("--chunked-step", default="128x256x16,128x256x64", help="cells for the chunked torch step")
    p.add_argument("--model", choices=["hf-patched", "compressm"], default="hf-patched")
    p.add_argument("--sections", default="1,2,3,4")
    args = p.parse_args(argv)
    global PROBE_OK
    torch.set_num_threads(args.threads)
    PROBE_OK = 50.0 * args.threads  # quiet machine: ~80-100 GFLOP/s per thread
    reps = args.reps or (2 if args.quick else 3)
    sections = set(args.sections.split(","))
    hf_cells = set() if args.hf == "none" else set(args.hf.split(","))
    chunked_cells = set() if args.chunked_step == "none" else set(args.chunked_step.split(","))

    from compressm_hf import kernels

    t0 = time.perf_counter()
    ok = kernels.is_available()
    print(f"# Mamba-1 selective scan benchmark\n\ntorch {torch.__version__}, threads {args.threads}, ")
    print(f"C++ kernel available: {ok} (build/load {time.perf_counter() - t0:.1f} s)")
    print(f"dispatcher picks for CPU float32: `{scan_mamba.scan_implementation('cpu', torch.float32)}`")
    print(f"probe before start: {probe():.0f} GFLOP/s (512^3 matmul; < {PROBE_OK:.0f} = contended, {FLAG})\n")
    print(
        "Times in seconds: median [min]. "
        + f"{FLAG}: a probe after a repetition fell below {PROBE_OK:.0f}.\n"
    )

    # ---------------- 1
    if "1" in sections:
        print("## 1. Scan only (one layer, fwd+bwd incl. softplus, D, gate), batch 8\n")
        print("| d_inner | L | N | ref | chunked | cpp | chunked / cpp | ref / cpp | probe GF/s |")
        print("|---|---|---|---|---|---|---|---|---|")
        shapes = [(256, 256), (512, 1024)]
        ns = [16, 128] if args.quick else [4, 16, 64, 128]
        for d, L in shapes:
            for n in ns:
                elems = 8 * d * L * n
                r_cpp = bench_scan("cpp", 8, d, L, n, reps, 1) if ok else None
                r_ch = bench_scan("chunked", 8, d, L, n, reps if elems < 2**26 else 1, 0)
                r_ref = bench_scan("ref", 8, d, L, n, 1, 0) if elems <= 2**24 else None
                ratio = lambda r, c=r_cpp: f"{r['min'] / c['min']:.1f}x" if r and c else "-"
                print(
                    f"| {d} | {L} | {n} | {fmt(r_ref)} | {fmt(r_ch)} | {fmt(r_cpp)} | {ratio(r_ch)} | "
                    f"{ratio(r_ref)} | {probes_str(r_ref, r_ch, r_cpp)} |",
                    flush=True,
                )
        print(
            "\nref is run once and only up to 2^24 (batch*d*L*N) elements (its autograd graph holds every "
            "state); ratios use the min.\n"
        )

    # ---------------- 2, 3, 4
    shapes = [(128, 256)] if args.quick else [(128, 256), (256, 1024)]
    sweep = [4, 16, 128] if args.quick else [4, 8, 16, 32, 64, 128]
    main_ns = [16, 64, 128]
    results = {}
    if sections & {"2", "3", "4"}:
        for hidden, L in shapes:
            for n in sorted(set(sweep) | set(main_ns)):
                if n not in sweep and "2" not in sections:
                    continue
                key = (hidden, L, n)
                cell = f"{hidden}x{L}x{n}"
                res = {}
                if ok:
                    res["cpp"] = bench_step("cpp", hidden, L, n, reps, 1, args.model)
                res["null"] = bench_step("null", hidden, L, n, reps, 1, args.model)
                if n in main_ns and "2" in sections:
                    if cell in chunked_cells:
                        res["chunked"] = bench_step("chunked", hidden, L, n, 1, 1, args.model)
                    if cell in hf_cells:
                        res["hf"] = bench_step("hf", hidden, L, n, 1, 0)
                results[key] = res
                print(
                    f"<!-- {cell}: " + ", ".join(f"{k} {fmt(v)}" for k, v in res.items()) + " -->",
                    flush=True,
                )

    if "2" in sections:
        print("\n## 2./3. Training step (4 layers, batch 8, vocab 256, AdamW), seconds\n")
        print(
            f"Model: {'CompreSSMMambaForCausalLM' if args.model == 'compressm' else 'transformers MambaForCausalLM, scan patched'}\n"
        )
        print(
            "| hidden | seq | N | transformers path | ours: cpp | ours: chunked torch | null scan (floor) | "
            "transformers / cpp | cpp / null | tokens/s (cpp) | probe GF/s |"
        )
        print("|---|---|---|---|---|---|---|---|---|---|---|")
        for hidden, L in shapes:
            for n in main_ns:
                res = results.get((hidden, L, n), {})
                hf, cpp, ch, nul = (res.get(k) for k in ("hf", "cpp", "chunked", "null"))
                speed = f"**{hf['min'] / cpp['min']:.0f}x**" if hf and cpp else "-"
                floor = f"{cpp['min'] / nul['min']:.2f}" if cpp and nul else "-"
                tps = f"{8 * L / cpp['median']:.0f}" if cpp else "-"
                print(
                    f"| {hidden} | {L} | {n} | {fmt(hf)} | {fmt(cpp)} | {fmt(ch)} | {fmt(nul)} | {speed} | "
                    f"{floor} | {tps} | {probes_str(hf, cpp, ch, nul)} |"
                )
        print(
            "\n'not run': transformers' path takes minutes to hours per step there (O(L^2 N) backward); "
            "ratios use the min.\n"
        )

    if "4" in sections:
        print("## 4. Step time vs d_state (ours: cpp), seconds\n")
        print(
            "| hidden | seq | N | cpp step | null step | scan share 1 - null/cpp | t(N) / t(16) | probe GF/s |"
        )
        print("|---|---|---|---|---|---|---|---|")
        fits = []
        for hidden, L in shapes:
            base = results.get((hidden, L, 16), {}).get("cpp")
            xs, ys = [], []
            for n in sweep:
                res = results.get((hidden, L, n), {})
                cpp, nul = res.get("cpp"), res.get("null")
                share = f"{100 * (1 - nul['min'] / cpp['min']):.0f} %" if cpp and nul else "-"
                rel = f"{cpp['min'] / base['min']:.2f}" if cpp and base else "-"
                print(
                    f"| {hidden} | {L} | {n} | {fmt(cpp)} | {fmt(nul)} | {share} | {rel} | {probes_str(cpp, nul)} |"
                )
                if cpp:
                    xs.append(n)
                    ys.append(cpp["min"])
            if len(xs) >= 2:
                mx, my = statistics.mean(xs), statistics.mean(ys)
                b = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
                a = my - b * mx
                ss = sum((y - a - b * x) ** 2 for x, y in zip(xs, ys))
                st = sum((y - my) ** 2 for y in ys) or 1.0
                fits.append(f"| {hidden} | {L} | {a:.3f} | {1e3 * b:.2f} | {1 - ss / st:.3f} |")
        if fits:
            print("\nLeast-squares fit of the min step time: t = a + b * N\n")
            print("| hidden | seq | a s | b ms/state | R^2 |\n|---|---|---|---|---|")
            print("\n".join(fits))


if __name__ == "__main__":
    main()
