"""End-to-end CompreSSM on a byte-level Mamba LM trained on Shakespeare (issue 4).

Everything goes through the real ``transformers.Trainer`` (AdamW, cosine schedule with warm-up):

0. **scouting**: the uncompressed model at d_state in ``--scout`` (default 4, 16, 64), seed = first
   seed. A compression benchmark only says something where validation perplexity improves with
   the state size; the table says whether it does at this size and step budget.
1. **comparison**, for every seed:

   * ``compressed``: built at d_state ``--n0`` (default 64) with ``CompreSSMCallback(tau=--tau)``
     (tolerance mode, default window (0, 0.1) of ``max_steps`` with 4 attempts, statistics collected
     during the 8 optimizer steps before each attempt);
   * ``uncompressed``: the same model without the callback (reused from the scouting run when
     ``--n0`` is among ``--scout`` and the seed is the first);
   * ``born small``: built from scratch at the compressed run's final per-layer sizes
     (``CompreSSMMambaConfig(state_sizes=...)``), same seed and steps.

Reported: final per-layer state sizes, validation perplexity ``exp(eval_loss)`` on the held-out tail
of the text, and training time (``trainer.train`` wall time and process CPU time, all threads; the
machine may be shared, so a 512^3 matmul probe in GFLOP/s is taken before and after every run: on a
busy machine compare CPU seconds, wall seconds mostly measure the other jobs).

    python benchmarks/bench_mamba_shakespeare.py                     # ~1.5 min quiet, 10+ min on a busy box
    python benchmarks/bench_mamba_shakespeare.py --quick             # smoke run, ~2 min
    python benchmarks/bench_mamba_shakespeare.py --seeds 1 2 --scout none   # more seeds, no scouting

``--architecture mamba2`` builds ``CompreSSMMamba2ForCausalLM`` instead (``--head-dim``, ``--n-groups``;
``num_heads = 2 * hidden / head_dim``). ``--out FILE`` appends one JSON line per run (command, seed, variant
label ``full`` / ``compressm`` / ``scratch``, final sizes, val ppl, train wall and CPU s, probes, load average),
``--variants`` picks the comparison runs of a process (to split seeds and variants over processes), and
``--summarize FILE...`` prints mean ± std per variant and the paired (by seed) CompreSSM − scratch and
CompreSSM − full perplexity differences with 95 % t-intervals (``bench_paper_claim.paired_ci``)::

    python benchmarks/bench_mamba_shakespeare.py --architecture mamba2 --hidden 128 --layers 4 --head-dim 32 \\
        --batch-size 16 --max-steps 600 --n0 128 --tau 0.04 --scout none --threads 1 --seeds 0 1 2 \\
        --out benchmarks/results/mamba2_shakespeare_runs.jsonl
    python benchmarks/bench_mamba_shakespeare.py --summarize benchmarks/results/mamba2_shakespeare_runs.jsonl
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_paper_claim as claim  # append_line, paired_ci: the JSONL records and the paired t-interval
from _timing import probe

VARIANTS = {"compressed": "compressm", "uncompressed": "full", "born_small": "scratch"}  # name -> JSONL label


def Progress(label: str):
    """A TrainerCallback that prints progress to stderr every 10 % of the steps."""
    from transformers import TrainerCallback

    class _Progress(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            every = max(1, state.max_steps // 10)
            if state.global_step % every == 0:
                print(
                    f"[{time.strftime('%H:%M:%S')}] {label}: step {state.global_step}",
                    file=sys.stderr,
                    flush=True,
                )

    return _Progress()


def build_model(args, state_sizes: list[int], seed: int):
    """A byte-level LM of ``args.architecture`` (``mamba``: Mamba-1, ``mamba2``: Mamba-2) at ``state_sizes``.

    Mamba-2: ``num_heads = 2 * hidden / head_dim`` (expand 2), ``n_groups`` groups, SSD chunks of at most 64 tokens.
    """
    torch.manual_seed(seed)
    common = dict(
        vocab_size=256,
        hidden_size=args.hidden,
        num_hidden_layers=args.layers,
        state_sizes=list(state_sizes),
        expand=2,
        conv_kernel=4,
        use_cache=False,
        tie_word_embeddings=True,
    )
    if args.architecture == "mamba2":
        from compressm_hf.modeling.mamba2 import CompreSSMMamba2Config, CompreSSMMamba2ForCausalLM

        inner = 2 * args.hidden
        if inner % args.head_dim != 0:
            raise SystemExit(f"--head-dim {args.head_dim} must divide 2 * --hidden = {inner} (expand 2)")
        cfg = CompreSSMMamba2Config(
            **common,
            num_heads=inner // args.head_dim,
            head_dim=args.head_dim,
            n_groups=args.n_groups,
            chunk_size=min(64, args.block_size),  # the CLI default; changes speed, not values
            pad_token_id=0,
            bos_token_id=0,
            eos_token_id=0,
        )
        return CompreSSMMamba2ForCausalLM(cfg)
    from compressm_hf.modeling.mamba import CompreSSMMambaConfig, CompreSSMMambaForCausalLM

    return CompreSSMMambaForCausalLM(CompreSSMMambaConfig(**common))


def run(args, splits, state_sizes: list[int], seed: int, compress: bool) -> dict:
    from transformers import PrinterCallback, Trainer, TrainingArguments

    from compressm_hf.trainer.callback import CompreSSMCallback

    model = build_model(args, state_sizes, seed)
    with tempfile.TemporaryDirectory() as out:
        targs = TrainingArguments(
            output_dir=out,
            max_steps=args.max_steps,
            per_device_train_batch_size=args.batch_size,
            per_device_eval_batch_size=32,
            learning_rate=args.lr,
            weight_decay=0.01,
            warmup_steps=max(1, int(0.05 * args.max_steps)),
            lr_scheduler_type="cosine",
            logging_steps=max(1, args.max_steps // 10),
            eval_strategy="no",
            save_strategy="no",
            report_to=[],
            seed=seed,
            data_seed=seed,
            use_cpu=True,
            dataloader_num_workers=0,
            disable_tqdm=True,
        )
        callbacks = []
        cb = None
        if compress:
            cb = CompreSSMCallback(
                tau=args.tau, statistics_steps=args.statistics_steps, round_to=args.round_to
            )
            callbacks.append(cb)
        trainer = Trainer(
            model=model,
            args=targs,
            train_dataset=splits["train"],
            eval_dataset=splits["validation"],
            callbacks=callbacks,
        )
        trainer.add_callback(Progress(f"d_state {fmt_sizes(state_sizes)} seed {seed} compress={compress}"))
        trainer.remove_callback(PrinterCallback)  # no per-log dict prints (disable_tqdm installs it)
        if cb is not None:
            cb.bind(trainer)
        load0 = os.getloadavg()[0]
        p0 = probe()
        t0, c0 = time.perf_counter(), time.process_time()
        trainer.train()
        train_time = time.perf_counter() - t0
        train_cpu = time.process_time() - c0
        p1 = probe()
        load1 = os.getloadavg()[0]
        metrics = trainer.evaluate()
        history = list(cb.history) if cb is not None else []
    sizes = [int(n) for n in model.config.state_sizes]
    return {
        "sizes": sizes,
        "initial": list(state_sizes),
        "eval_loss": float(metrics["eval_loss"]),
        "ppl": math.exp(float(metrics["eval_loss"])),
        "train_time": train_time,
        "train_cpu": train_cpu,
        "probes": (p0, p1),
        "load_avg": (load0, load1),
        "params": sum(p.numel() for p in model.parameters()),
        "events": history,
    }


def record(args, r: dict, seed: int, name: str) -> None:
    """Append run ``r`` (of variant ``name``, a key of ``VARIANTS``) as one JSON line to ``args.out``."""
    if not args.out:
        return
    claim.append_line(
        args.out,
        {
            "label": VARIANTS.get(name, name),
            "seed": seed,
            "command": args.command,
            "architecture": args.architecture,
            "max_steps": args.max_steps,
            "tau": args.tau if name == "compressed" else None,
            "initial_state_sizes": r["initial"],
            "state_sizes": r["sizes"],
            "mean_state_size": statistics.fmean(r["sizes"]),
            "params": r["params"],
            "eval_loss": r["eval_loss"],
            "ppl": r["ppl"],
            "train_s": r["train_time"],
            "train_cpu_s": r["train_cpu"],
            "probe_gflops": list(r["probes"]),
            "load_avg": r["load_avg"],
            "events": [{k: ev.get(k) for k in ("step", "sizes_before", "sizes_after")} for ev in r["events"]],
        },
    )


def summarize(paths: list[str]) -> dict:
    """Print (markdown) and return mean ± std per variant of the JSONL runs in ``paths``, and the paired
    (by seed) CompreSSM − scratch and CompreSSM − full validation-perplexity differences with 95 % t-intervals
    (negative: CompreSSM has the lower perplexity)."""
    runs = [json.loads(x) for p in paths for x in Path(p).read_text().splitlines() if x.strip()]
    by_label: dict[str, list[dict]] = {}
    for r in runs:
        by_label.setdefault(r["label"], []).append(r)
    commands = sorted({r["command"] for r in runs})
    print("commands:\n" + "\n".join(f"  {c}" for c in commands) + "\n")
    print(
        "| variant | seeds | val ppl mean ± std | final sizes | train wall s / run | train CPU s / run "
        "| probe GF/s (min) | load avg (1 min) |\n|---|---|---|---|---|---|---|---|"
    )
    sd = lambda v: statistics.stdev(v) if len(v) > 1 else 0.0
    result: dict = {"commands": commands, "rows": {}}
    for label in ("full", "compressm", "scratch"):
        rs = sorted(by_label.get(label, []), key=lambda r: r["seed"])
        if not rs:
            continue
        ppl = [r["ppl"] for r in rs]
        wall, cpu = [r["train_s"] for r in rs], [r["train_cpu_s"] for r in rs]
        sizes = sorted({fmt_sizes(r["state_sizes"]) for r in rs})
        gf = min(min(r["probe_gflops"]) for r in rs)
        loads = [x for r in rs for x in r.get("load_avg") or []]
        load = f"{min(loads):.1f}-{max(loads):.1f}" if loads else "n/a"
        result["rows"][label] = {
            "seeds": [r["seed"] for r in rs],
            "ppl": ppl,
            "train_s": wall,
            "train_cpu_s": cpu,
        }
        print(
            f"| {label} | {len(rs)} | {statistics.fmean(ppl):.3f} ± {sd(ppl):.3f} | {', '.join(sizes)} | "
            f"{statistics.fmean(wall):.0f} ± {sd(wall):.0f} | {statistics.fmean(cpu):.0f} ± {sd(cpu):.0f} | "
            f"{gf:.0f} | {load} |"
        )
    ppl_of = {k: {r["seed"]: r["ppl"] for r in v} for k, v in by_label.items()}
    for other in ("scratch", "full"):
        if "compressm" not in ppl_of or other not in ppl_of:
            continue
        ci = claim.paired_ci(ppl_of["compressm"], ppl_of[other])
        result[f"compressm_minus_{other}"] = ci
        if len(ci["seeds"]) > 1:
            print(
                f"\ncompressm - {other} val ppl (paired by seed, n={len(ci['seeds'])}): {ci['mean']:+.4f}, "
                f"95% CI [{ci['low']:+.4f}, {ci['high']:+.4f}], p = {ci['p']:.3g}, "
                f"compressm lower on {len(ci['seeds']) - ci['wins']}/{len(ci['seeds'])} seeds"
            )
    return result


def fmt_sizes(sizes: list[int]) -> str:
    return "[" + ", ".join(str(s) for s in sizes) + "]"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--max-steps", type=int, default=None, help="optimizer steps per run (default 300)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--tau", type=float, default=0.05, help="CompreSSMCallback tolerance (default 0.05)")
    p.add_argument("--n0", type=int, default=64, help="d_state the compressed and uncompressed runs start at")
    p.add_argument("--scout", default="4,16,64", help="d_state values of the scouting runs ('none': skip)")
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--block-size", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--statistics-steps", type=int, default=8)
    p.add_argument("--round-to", type=int, default=1)
    p.add_argument("--max-train-blocks", type=int, default=None)
    p.add_argument("--max-eval-blocks", type=int, default=64)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--quick", action="store_true", help="smoke run: 60 steps, scouting 4 and 64 only")
    p.add_argument("--json", default=None, help="also write the raw results here")
    p.add_argument(
        "--architecture", choices=["mamba", "mamba2"], default="mamba", help="Mamba-1 or Mamba-2 LM"
    )
    p.add_argument(
        "--head-dim", type=int, default=32, help="mamba2: head size (num_heads = 2 * hidden / head_dim)"
    )
    p.add_argument("--n-groups", type=int, default=1, help="mamba2: groups sharing B and C")
    p.add_argument(
        "--variants",
        nargs="+",
        choices=list(VARIANTS),
        default=list(VARIANTS),
        help="comparison runs per seed (born_small needs compressed); split runs over processes with this",
    )
    p.add_argument("--out", default=None, metavar="JSONL", help="append one JSON line per run here")
    p.add_argument("--summarize", nargs="+", metavar="JSONL", help="no training: the table of these files")
    p.add_argument("--summary-json", metavar="JSON", help="with --summarize: also write the summary here")
    args = p.parse_args(argv)
    if args.summarize:
        result = summarize(args.summarize)
        if args.summary_json:
            Path(args.summary_json).write_text(json.dumps(result, indent=2) + "\n")
        return result
    if "born_small" in args.variants and "compressed" not in args.variants:
        raise SystemExit(
            f"--variants {' '.join(args.variants)}: born_small needs compressed (its final sizes)"
        )
    args.command = "python benchmarks/bench_mamba_shakespeare.py " + " ".join(
        sys.argv[1:] if argv is None else argv
    )
    if args.max_steps is None:
        args.max_steps = 60 if args.quick else 300
    if args.quick and args.scout == "4,16,64":
        args.scout = "4,64"
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    logging.getLogger("transformers").setLevel(logging.ERROR)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()

    from compressm_hf.data import byte_lm_splits, load_text

    text = load_text("shakespeare")
    splits = byte_lm_splits(
        text,
        block_size=args.block_size,
        validation_fraction=0.05,
        max_train_blocks=args.max_train_blocks,
        max_validation_blocks=args.max_eval_blocks,
    )
    scout = [] if args.scout == "none" else [int(x) for x in args.scout.split(",")]
    L = args.layers
    arch = "Mamba-2" if args.architecture == "mamba2" else "Mamba"
    print(f"# CompreSSM on Shakespeare (byte-level {arch} LM, transformers Trainer)\n")
    shape = f", head_dim {args.head_dim}, {args.n_groups} group(s)" if args.architecture == "mamba2" else ""
    print(
        f"torch {torch.__version__}, threads {args.threads}; model: {L} layers, hidden {args.hidden}, expand 2{shape}, "
        f"vocab 256; block {args.block_size}, batch {args.batch_size}, {args.max_steps} steps "
        f"({args.max_steps * args.batch_size * args.block_size / 1e6:.2f} M tokens, "
        f"{len(splits['train'])} train blocks), AdamW lr {args.lr} cosine, "
        f"validation: {len(splits['validation'])} blocks of the held-out last 5 % of the text.\n"
    )
    t_all = time.perf_counter()
    results: dict = {"scout": {}, "runs": {}}

    def line(name, r):
        return (
            f"| {name} | {fmt_sizes(r['initial'])} | {fmt_sizes(r['sizes'])} | {r['params']:,} | "
            f"{r['ppl']:.3f} | {r['eval_loss']:.4f} | {r['train_time']:.0f} | {r['train_cpu']:.0f} | "
            f"{r['probes'][0]:.0f} / {r['probes'][1]:.0f} |"
        )

    header = (
        "| run | initial d_state | final d_state | params | val ppl | val loss | train wall s | train CPU s "
        "| probe GF/s before/after |\n"
        "|---|---|---|---|---|---|---|---|---|"
    )
    if scout:
        s0 = args.seeds[0]
        print(f"## 0. Scouting: does validation perplexity improve with d_state? (seed {s0})\n")
        print(header, flush=True)
        for n in scout:
            r = run(args, splits, [n] * L, s0, compress=False)
            results["scout"][n] = r
            record(args, r, s0, f"scout-n{n}")
            print(line(f"uncompressed d_state {n}", r), flush=True)
        ppls = [results["scout"][n]["ppl"] for n in scout]
        grows = all(b < a for a, b in zip(ppls, ppls[1:]))
        print(
            f"\nPerplexity {'decreases monotonically' if grows else 'does NOT decrease monotonically'} with "
            f"d_state over {scout}: " + ", ".join(f"{n}: {q:.3f}" for n, q in zip(scout, ppls)) + "\n",
            flush=True,
        )

    print(f"## 1. Compressed (from {args.n0}, tau {args.tau}) vs uncompressed vs born small\n")
    print("| seed " + header.replace("\n", "\n|---"), flush=True)
    for seed in args.seeds:
        res = {}
        if "compressed" in args.variants:
            res["compressed"] = run(args, splits, [args.n0] * L, seed, compress=True)
            record(args, res["compressed"], seed, "compressed")
            print(f"| {seed} " + line("compressed", res["compressed"]), flush=True)
        if "uncompressed" in args.variants:
            if seed == args.seeds[0] and args.n0 in results["scout"]:
                res["uncompressed"] = results["scout"][args.n0]
                note = " (scouting run)"
                record(
                    args, res["uncompressed"], seed, "uncompressed"
                )  # the same run, under its variant label
            else:
                res["uncompressed"] = run(args, splits, [args.n0] * L, seed, compress=False)
                record(args, res["uncompressed"], seed, "uncompressed")
                note = ""
            print(f"| {seed} " + line("uncompressed" + note, res["uncompressed"]), flush=True)
        if "born_small" in args.variants:
            res["born_small"] = run(args, splits, res["compressed"]["sizes"], seed, compress=False)
            record(args, res["born_small"], seed, "born_small")
            print(f"| {seed} " + line("born small (final sizes)", res["born_small"]), flush=True)
        results["runs"][seed] = res

    if len(args.seeds) > 1:
        print("\n### Mean over seeds\n")
        print(
            "| run | val ppl mean | val ppl min-max | train wall s mean | train CPU s mean |\n|---|---|---|---|---|"
        )
        for name in args.variants:
            ppl = [results["runs"][s][name]["ppl"] for s in args.seeds]
            tt = [results["runs"][s][name]["train_time"] for s in args.seeds]
            tc = [results["runs"][s][name]["train_cpu"] for s in args.seeds]
            print(
                f"| {name} | {statistics.mean(ppl):.3f} | {min(ppl):.3f}-{max(ppl):.3f} | {statistics.mean(tt):.0f} | {statistics.mean(tc):.0f} |"
            )

    print("\n### Compression events (first seed)\n")
    for ev in results["runs"][args.seeds[0]].get("compressed", {}).get("events", []):
        keys = ("step", "sizes", "sizes_before", "sizes_after", "layers")
        short = {k: ev[k] for k in keys if k in ev and k != "layers"}
        print(f"- {json.dumps(short) if short else json.dumps(ev, default=str)[:300]}")
    print(f"\nTotal wall time {time.perf_counter() - t_all:.0f} s.")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1, default=str)


if __name__ == "__main__":
    main()
