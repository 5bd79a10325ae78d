"""Mamba-2 training step on CPU: ours against transformers' ``Mamba2ForCausalLM``, and compressed against born small.

Issue 11 item 3. One step is ``loss = model(ids, labels=ids).loss; loss.backward(); zero_grad`` (forward and
backward, no optimizer) on random byte ids, 4 layers, vocab 256, expand 2, ``n_groups`` 1, chunk 256.

* **Section 1, step time vs d_state**: for every d_state, our ``CompreSSMMamba2ForCausalLM`` and transformers'
  ``Mamba2ForCausalLM`` (its torch path: ``mamba_ssm`` is not installed on CPU) with the same weights, their
  losses compared, steps **interleaved** (A B B A ...) so that load from other jobs hits both.
* **Section 2, compressed vs born small**: a model built at ``--n0`` (128) whose every layer keeps ``r``
  states per group through ``mixer.reduce_`` (what ``CompreSSMCallback`` applies; which states does not matter
  for speed), against one built at ``r``; target ratio <= 1.05.

Reported per cell: median and min of process CPU time (``time.process_time``, robust to load on a shared
machine) and of wall time over ``--reps`` steps after ``--warmup``, the ratios of CPU medians, and the
1-minute load average before and after. ``--profile N`` prints the top operators of our step at d_state N.

    python benchmarks/bench_mamba2_step.py                      # hidden 256, seq 512, batch 8, N 16/64/128, r 32
    python benchmarks/bench_mamba2_step.py --quick              # seq 256, batch 4, fewer reps
    python benchmarks/bench_mamba2_step.py --profile 128 --skip-bench
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch


def configs(hidden: int, layers: int, head_dim: int, n: int, chunk: int):
    """Our config and the stock one, same shapes (``n`` states per group in every layer)."""
    from transformers import Mamba2Config

    from compressm_hf.modeling.mamba2 import CompreSSMMamba2Config

    shape = dict(
        vocab_size=256,
        hidden_size=hidden,
        num_hidden_layers=layers,
        expand=2,
        head_dim=head_dim,
        num_heads=2 * hidden // head_dim,
        n_groups=1,
        chunk_size=chunk,
        use_cache=False,
        tie_word_embeddings=True,
    )
    return CompreSSMMamba2Config(**shape, state_sizes=[n] * layers), Mamba2Config(**shape, state_size=n)


def build_pair(args, n: int):
    from transformers import Mamba2ForCausalLM

    from compressm_hf.modeling.mamba2 import CompreSSMMamba2ForCausalLM

    ours_cfg, stock_cfg = configs(args.hidden, args.layers, args.head_dim, n, args.chunk)
    torch.manual_seed(0)
    ours = CompreSSMMamba2ForCausalLM(ours_cfg).train()
    stock = Mamba2ForCausalLM(stock_cfg).train()
    stock.load_state_dict(ours.state_dict())
    return ours, stock


def make_step(model, ids):
    def step():
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        model.zero_grad(set_to_none=True)
        return float(loss.detach())

    return step


def compress(model, r: int, seed: int = 0):
    """Keep ``r`` random states per group in every layer with ``mixer.reduce_`` (a modal plan)."""
    from compressm_hf.protocol import ReductionPlan

    gen = torch.Generator().manual_seed(seed)
    for mixer in model.mixers():
        n, G = mixer.state_size, mixer.n_groups
        keep = torch.stack([torch.randperm(n, generator=gen)[:r].sort().values for _ in range(G)])
        plan = ReductionPlan(
            n=n, rank=r, hsv=torch.ones(n), energy_kept=r / n, error_bound=0.0, rule="modal", keep=keep
        )
        mixer.reduce_(plan)
    return model


def timed(steps: dict, reps: int, warmup: int) -> dict:
    """Run every step ``warmup`` times, then ``reps`` timed rounds in alternating order; (cpu, wall) lists."""
    for fn in steps.values():
        for _ in range(warmup):
            fn()
    out = {k: [] for k in steps}
    names = list(steps)
    for i in range(reps):
        for k in names if i % 2 == 0 else names[::-1]:
            t, c = time.perf_counter(), time.process_time()
            steps[k]()
            out[k].append((time.process_time() - c, time.perf_counter() - t))
    return out


def stats(samples) -> dict:
    cpu = [c for c, _ in samples]
    wall = [w for _, w in samples]
    return {
        "cpu": statistics.median(cpu),
        "cpu_min": min(cpu),
        "wall": statistics.median(wall),
        "wall_min": min(wall),
    }


def fmt(s: dict) -> str:
    return f"{s['cpu']:.3f} [{s['cpu_min']:.3f}] | {s['wall']:.3f} [{s['wall_min']:.3f}]"


def section_dstate(args, ids):
    print(
        f"\n## step time vs d_state (hidden {args.hidden}, {args.layers} layers, head_dim {args.head_dim}, "
        f"seq {ids.shape[1]}, batch {ids.shape[0]}, {args.threads} thread(s), {args.reps} reps)\n"
    )
    print("| d_state | ours CPU s [min] \\| wall s [min] | transformers CPU s [min] \\| wall s [min] "
          "| ours/transformers (CPU) | load 1 min |")
    print("|---|---|---|---|---|")
    rows = {}
    for n in args.states:
        ours, stock = build_pair(args, n)
        with torch.no_grad():
            lo, ls = float(ours(ids, labels=ids).loss), float(stock(ids, labels=ids).loss)
        if abs(lo - ls) > 1e-4 * max(1.0, abs(ls)):
            raise RuntimeError(f"d_state {n}: losses differ, ours {lo} vs transformers {ls}")
        load0 = os.getloadavg()[0]
        t = timed({"ours": make_step(ours, ids), "stock": make_step(stock, ids)}, args.reps, args.warmup)
        so, ss = stats(t["ours"]), stats(t["stock"])
        rows[n] = so
        print(
            f"| {n} | {fmt(so)} | {fmt(ss)} | {so['cpu'] / ss['cpu']:.2f} | {load0:.2f}-{os.getloadavg()[0]:.2f} |",
            flush=True,
        )
        del ours, stock
    if len(rows) > 1:
        lo_n, hi_n = min(rows), max(rows)
        print(f"\nours: CPU time at d_state {hi_n} / at {lo_n}: {rows[hi_n]['cpu'] / rows[lo_n]['cpu']:.2f}")


def section_compressed(args, ids):
    from compressm_hf.modeling.mamba2 import CompreSSMMamba2ForCausalLM

    print(f"\n## compressed {args.n0} -> r against born at r (same shapes, {args.reps} reps)\n")
    print("| r | compressed CPU s [min] \\| wall s [min] | born at r CPU s [min] \\| wall s [min] "
          "| compressed/born (CPU) | load 1 min |")
    print("|---|---|---|---|---|")
    for r in args.ranks:
        torch.manual_seed(0)
        comp = compress(CompreSSMMamba2ForCausalLM(configs(args.hidden, args.layers, args.head_dim, args.n0,
                                                           args.chunk)[0]).train(), r)
        torch.manual_seed(0)
        born = CompreSSMMamba2ForCausalLM(configs(args.hidden, args.layers, args.head_dim, r, args.chunk)[0]).train()
        shapes_c = {k: tuple(p.shape) for k, p in comp.named_parameters()}
        shapes_b = {k: tuple(p.shape) for k, p in born.named_parameters()}
        if shapes_c != shapes_b:
            raise RuntimeError("the compressed and the born-small model have different parameter shapes")
        load0 = os.getloadavg()[0]
        t = timed({"comp": make_step(comp, ids), "born": make_step(born, ids)}, args.reps, args.warmup)
        sc, sb = stats(t["comp"]), stats(t["born"])
        print(
            f"| {r} | {fmt(sc)} | {fmt(sb)} | {sc['cpu'] / sb['cpu']:.2f} | {load0:.2f}-{os.getloadavg()[0]:.2f} |",
            flush=True,
        )
        del comp, born


def profile(args, ids, n: int):
    ours, _ = build_pair(args, n)
    step = make_step(ours, ids)
    step()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        step()
    print(f"\n## profile of our step at d_state {n}\n")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.profile_rows))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--chunk", type=int, default=256, help="config.chunk_size of both models")
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--states", default="16,64,128")
    p.add_argument("--n0", type=int, default=128)
    p.add_argument("--ranks", default="32")
    p.add_argument("--reps", type=int, default=4)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--quick", action="store_true", help="seq 256, batch 4, 2 reps")
    p.add_argument("--profile", type=int, default=None, metavar="N", help="profile our step at d_state N")
    p.add_argument("--profile-rows", type=int, default=25)
    p.add_argument("--skip-bench", action="store_true", help="only the profile")
    args = p.parse_args(argv)
    if args.quick:
        args.seq, args.batch, args.reps = 256, 4, 2
    args.states = [int(v) for v in args.states.split(",")]
    args.ranks = [int(v) for v in args.ranks.split(",")]
    torch.set_num_threads(args.threads)
    ids = torch.randint(0, 256, (args.batch, args.seq), generator=torch.Generator().manual_seed(1))
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, load average {os.getloadavg()}")
    if not args.skip_bench:
        section_dstate(args, ids)
        section_compressed(args, ids)
    if args.profile is not None:
        profile(args, ids, args.profile)


if __name__ == "__main__":
    main()
