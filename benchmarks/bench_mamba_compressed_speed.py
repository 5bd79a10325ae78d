"""Does a Mamba LM compressed to d_state r train as fast as one born at r? (issue 4)

For every shape and every r:

* **compressed**: a 4-layer ``CompreSSMMambaForCausalLM`` (vocab 256, expand 2) built at d_state
  ``--n0`` (default 128) takes one AdamW step (so the optimizer has moments), collects the averaged
  LTI surrogate statistics on ``--stat-batches`` training batches, plans a modal cut to exactly r per
  layer with ``compressm_hf.plan_reduction(RankPolicy(mode="fixed", ...))``, applies it with
  ``mixer.reduce_(plan)`` and moves the AdamW state with
  ``compressm_hf.trainer.surgery.transplant_optimizer_state`` (what ``CompreSSMCallback`` does);
* **born small**: the same model built at d_state r from scratch, fresh AdamW.

Both then run the same training step (fwd + bwd + AdamW, batch 8, same input ids), **interleaved**
(A B A B ...) so that contention from other jobs hits both; the table reports median [min] step time
and the ratio compressed / born-small of medians and of mins (target: within 5 %).

Layout checks printed per cell (the suspects if the ratio is off): every parameter and every AdamW
state tensor contiguous, same shapes and strides as the born-small model, same parameter count, same
optimizer param-group layout, and no denormal floats in the kept ``A_log`` decays.

Step time vs d_state (4..128) is section 4 of ``benchmarks/bench_mamba_scan.py`` and is not repeated.

Noise: after every pair of steps a 512^3 matmul probe (GFLOP/s) is recorded; cells whose lowest probe
fell below 50 GFLOP/s per thread are flagged with a double dagger.

    python benchmarks/bench_mamba_compressed_speed.py                 # h128/L256 and h256/L1024
    python benchmarks/bench_mamba_compressed_speed.py --quick         # h128/L256 only, fewer reps
"""

from __future__ import annotations

import argparse
import gc
import statistics
import time

import torch
from _timing import FLAG, probe


def build(hidden: int, n: int, layers: int, seed: int):
    from compressm_hf.modeling.mamba import CompreSSMMambaConfig, CompreSSMMambaForCausalLM

    torch.manual_seed(seed)
    cfg = CompreSSMMambaConfig(
        vocab_size=256,
        hidden_size=hidden,
        state_size=n,
        num_hidden_layers=layers,
        expand=2,
        conv_kernel=4,
        use_cache=False,
        tie_word_embeddings=True,
    )
    model = CompreSSMMambaForCausalLM(cfg)
    model.train()
    return model


def make_step(model, opt, ids):
    def step():
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def compress_to(model, opt, r: int, batches: list[torch.Tensor]) -> list[dict]:
    """Collect surrogate statistics, plan a modal cut to exactly ``r`` states, apply, transplant."""
    from compressm_hf import RankPolicy, plan_reduction
    from compressm_hf.trainer.surgery import transplant_optimizer_state

    model.set_collect_statistics(True)
    with torch.no_grad():
        for ids in batches:
            model(input_ids=ids)
    model.set_collect_statistics(False)
    events = []
    for mixer in model.mixers():
        n = mixer.state_size
        # mode="fixed" keeps floor((1 - f) * n) states; f chosen so that this is exactly r
        policy = RankPolicy(tau=0.0, mode="fixed", fixed_fraction=(n - r - 0.5) / n)
        plan = plan_reduction(mixer.lti_system(), policy)
        assert plan is not None and plan.rank == r, (plan, r)
        swaps = mixer.reduce_(plan)
        transplant_optimizer_state(opt, swaps)
        events.append({"keep": plan.keep.tolist(), "energy": plan.energy_kept})
    return events


def layout_report(comp, small, opt_c, opt_s) -> dict:
    pc, ps = dict(comp.named_parameters()), dict(small.named_parameters())
    issues = []
    if set(pc) != set(ps):
        issues.append("param names differ")
    for name, p in pc.items():
        q = ps.get(name)
        if not p.is_contiguous():
            issues.append(f"{name} non-contiguous")
        if q is not None and (p.shape != q.shape or p.stride() != q.stride()):
            issues.append(f"{name} {tuple(p.shape)}/{p.stride()} vs {tuple(q.shape)}/{q.stride()}")
    for p in comp.parameters():
        st = opt_c.state.get(p, {})
        for k, v in st.items():
            if torch.is_tensor(v) and v.dim() > 0 and (v.shape != p.shape or not v.is_contiguous()):
                issues.append(
                    f"adam {k} of {tuple(p.shape)}: {tuple(v.shape)} contiguous={v.is_contiguous()}"
                )
    missing = sum(1 for p in comp.parameters() if p.requires_grad and p not in opt_c.state)
    if missing:
        issues.append(f"{missing} params without AdamW state")
    groups_c = [len(g["params"]) for g in opt_c.param_groups]
    groups_s = [len(g["params"]) for g in opt_s.param_groups]
    if groups_c != groups_s:
        issues.append(f"param groups {groups_c} vs {groups_s}")
    in_opt = {id(p) for g in opt_c.param_groups for p in g["params"]}
    stale = sum(1 for p in comp.parameters() if id(p) not in in_opt)
    if stale:
        issues.append(f"{stale} model params not in optimizer")
    tiny = 0
    for m in comp.mixers():
        a = torch.exp(m.A_log.detach())
        tiny += int(((a != 0) & (a.abs() < torch.finfo(torch.float32).tiny)).sum())
    if tiny:
        issues.append(f"{tiny} denormal A")
    nc = sum(p.numel() for p in comp.parameters())
    ns = sum(p.numel() for p in small.parameters())
    if nc != ns:
        issues.append(f"numel {nc} vs {ns}")
    return {"ok": not issues, "issues": issues, "numel": nc}


def summarize(samples: list[tuple[float, float]]) -> dict:
    wall = [w for w, _ in samples]
    cpu = [c for _, c in samples]
    return {"median": statistics.median(wall), "min": min(wall), "cpu": statistics.median(cpu)}


def bench_cell(hidden, L, n0, r, reps, warmup, stat_batches, layers=4, batch=8):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 256, (batch, L), generator=g)
    stats = [torch.randint(0, 256, (batch, L), generator=g) for _ in range(stat_batches)]

    comp = build(hidden, n0, layers, seed=0)
    opt_c = torch.optim.AdamW(comp.parameters(), lr=1e-3)
    make_step(comp, opt_c, ids)()  # one step at n0: the AdamW moments exist before the cut
    events = compress_to(comp, opt_c, r, stats)

    small = build(hidden, r, layers, seed=0)
    opt_s = torch.optim.AdamW(small.parameters(), lr=1e-3)
    layout = layout_report(comp, small, opt_c, opt_s)

    step_c, step_s = make_step(comp, opt_c, ids), make_step(small, opt_s, ids)
    for _ in range(warmup):
        step_c()
        step_s()
    tc, ts, probes = [], [], []
    for i in range(reps):
        # alternate which model goes first so that neither always follows the other
        order = [(step_c, tc), (step_s, ts)] if i % 2 == 0 else [(step_s, ts), (step_c, tc)]
        for fn, out in order:
            t, c = time.perf_counter(), time.process_time()
            fn()
            out.append((time.perf_counter() - t, time.process_time() - c))
        probes.append(probe())
    kept_max = max(max(e["keep"]) for e in events)
    energy = min(e["energy"] for e in events)
    del comp, small, opt_c, opt_s
    gc.collect()
    return {
        "c": summarize(tc),
        "s": summarize(ts),
        "probes": probes,
        "layout": layout,
        "kept_max": kept_max,
        "energy": energy,
    }


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="h128/L256 only, fewer repetitions")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--n0", type=int, default=128, help="d_state the compressed model is built at")
    p.add_argument("--ranks", default="8,16,32")
    p.add_argument("--shapes", default=None, help="HIDDENxSEQ,... (default 128x256,256x1024)")
    p.add_argument("--reps", type=int, default=None, help="timed steps per model (default 12; quick 6)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--stat-batches", type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    probe_ok = 50.0 * args.threads
    ranks = [int(x) for x in args.ranks.split(",")]
    if args.shapes:
        shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    else:
        shapes = [(128, 256)] if args.quick else [(128, 256), (256, 1024)]
    reps = args.reps or (6 if args.quick else 12)

    from compressm_hf import kernels

    t0 = time.perf_counter()
    ok = kernels.is_available()
    print("# Compressed vs born-small Mamba: training-step time\n")
    print(
        f"torch {torch.__version__}, threads {args.threads}, C++ scan available: {ok} "
        f"(build/load {time.perf_counter() - t0:.1f} s); 4 layers, batch 8, vocab 256, expand 2, AdamW; "
        f"compressed = built at d_state {args.n0}, 1 AdamW step, statistics on {args.stat_batches} batches, "
        f"modal cut to r via plan_reduction + reduce_ + transplant_optimizer_state.\n"
    )
    print(f"probe before start: {probe():.0f} GFLOP/s (512^3 matmul; < {probe_ok:.0f} = contended, {FLAG})\n")
    print(
        f"Step times in ms, median [min] over {reps} interleaved steps per model (after {args.warmup} "
        "warm-up steps each). Ratio = compressed / born small. CPU: process CPU time of the step "
        "(time.process_time, all threads; less sensitive to waiting for a core than wall time, but "
        "OpenMP spin-waits count too: cleanest with --threads 1).\n"
    )
    print(
        "| hidden | seq | r | compressed (from 128) | born small | ratio median | ratio min "
        "| CPU ms median comp / small | ratio CPU | layout identical | max kept index | min energy kept | probe GF/s |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    notes = []
    t_all = time.perf_counter()
    for hidden, L in shapes:
        for r in ranks:
            res = bench_cell(hidden, L, args.n0, r, reps, args.warmup, args.stat_batches)
            c, s = res["c"], res["s"]
            flag = f" {FLAG}" if min(res["probes"]) < probe_ok else ""
            lay = "yes" if res["layout"]["ok"] else "**no**"
            if not res["layout"]["ok"]:
                notes.append(f"{hidden}x{L} r={r}: " + "; ".join(res["layout"]["issues"][:8]))
            print(
                f"| {hidden} | {L} | {r} | {1e3 * c['median']:.1f} [{1e3 * c['min']:.1f}] | "
                f"{1e3 * s['median']:.1f} [{1e3 * s['min']:.1f}] | {c['median'] / s['median']:.3f} | "
                f"{c['min'] / s['min']:.3f} | {1e3 * c['cpu']:.0f} / {1e3 * s['cpu']:.0f} | "
                f"{c['cpu'] / s['cpu']:.3f} | {lay} | {res['kept_max']} | {res['energy']:.3f} | "
                f"{min(res['probes']):.0f}-{max(res['probes']):.0f}{flag} |",
                flush=True,
            )
    print(
        "\nlayout identical: every parameter and AdamW moment contiguous, same shapes and strides as the "
        "born-small model, same parameter count and param groups, no denormal decays. max kept index: "
        "largest original state index kept in any layer (the init has A_n = n, so > r means faster-decaying "
        "states were kept). "
        f"Total {time.perf_counter() - t_all:.0f} s."
    )
    for line in notes:
        print(f"\n- layout difference: {line}")


if __name__ == "__main__":
    main()
