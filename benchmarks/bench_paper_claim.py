"""The paper's claim in the paper's regime: does CompreSSM beat a model trained from scratch at equal size?

Regime: the official code's sequence-classification block (``LRUConfig.paper_sequence_classification``: one
block, BatchNorm without affine, no final norm, fan-in uniform init, ring ``[0.9, 0.999]``, dropout 0.1),
small hidden size and a large state (``n0 = 256``), on MNIST-1D (40 steps, 10 classes, 8000 train / 2000
test, regenerated offline with ``mnist1d.make_dataset``). Sequential Fashion-MNIST is not installed here.

Two phases, each appending one JSON line per training run to ``--out`` (so an interrupted run keeps what
it finished, and seeds can run in separate processes):

* ``--phase scout``: from scratch at every size of ``--sizes``; shows where accuracy still grows with n.
* ``--phase claim``: per seed, ``full`` (n0), ``compressm`` (``CompreSSMCallback``, 4 attempts in the
  first 10 % of the steps, inside the warm-up; per-layer ``--tau``, or a global state budget
  ``--target-mean-state`` for which the callback finds the tau at each attempt), ``scratch`` (from scratch at
  CompreSSM's exact per-layer final sizes, same seed), and the selection ablation ``compressm-smallest`` /
  ``compressm-random`` (same rule, keep the smallest / random balanced states; ``--phase ablation`` runs
  only these).
* ``--summarize FILE...``: no training; the table: mean ± std, top-3-of-5 mean (the paper's statistic),
  wall-clock, and the 95 % confidence interval of the paired (by seed) CompreSSM − scratch difference
  (t distribution, ``scipy.stats``).

Every model is trained by the harness of ``benchmarks/bench_lru_compression.py`` (stock ``Trainer``, AdamW,
linear warm-up 10 % + cosine, gradient clipping 1.0, offline ``evaluate`` accuracy, test accuracy read once
at the end); only the model configuration is the paper's block.

Examples::

    python benchmarks/bench_paper_claim.py --phase scout --sizes 4 8 16 32 64 256 --seeds 0 1 \\
        --out benchmarks/results/paper_claim_scout.jsonl
    python benchmarks/bench_paper_claim.py --phase claim --seeds 0 1 2 3 4 --target-mean-state 16 \\
        --no-ablation --out benchmarks/results/paper_claim_runs.jsonl
    python benchmarks/bench_paper_claim.py --phase ablation --seeds 0 1 2 --target-mean-state 16 \\
        --out benchmarks/results/paper_claim_runs.jsonl
    python benchmarks/bench_paper_claim.py --summarize benchmarks/results/paper_claim_runs.jsonl \\
        --summary-json benchmarks/results/paper_claim_summary.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_lru_compression as harness

CLAIM_LABELS = ("full", "compressm", "scratch", "compressm-smallest", "compressm-random")


def paper_block_config(args, num_labels: int, state_sizes: list[int] | None = None):
    """``LRUConfig.paper_sequence_classification`` with this run's sizes; replaces the harness's config."""
    from compressm_hf.modeling.lru import LRUConfig

    # --block layernorm: the language-modelling block (LayerNorm, final norm, normal init), all else equal
    block = (
        {} if args.block == "paper" else dict(norm_type="layernorm", final_norm=True, initializer="normal")
    )
    return LRUConfig.paper_sequence_classification(
        **block,
        num_labels=num_labels,
        hidden_size=args.hidden_size,
        num_hidden_layers=args.layers,
        state_size=args.state_size,
        state_sizes=state_sizes,
        hidden_dropout=args.dropout,
        scan_implementation=args.scan,
    )


def append_line(path: str, record: dict) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def run_scout(args, data, command: str) -> None:
    for seed in args.seeds:
        for size in args.sizes:
            label = f"scratch-n{size}" + ("" if args.block == "paper" else f"-{args.block}")
            r = harness.train_run(args, data, seed=seed, state_sizes=[size] * args.layers, label=label)
            append_line(args.out, {**r, "phase": "scout", "command": command, "n": size, "block": args.block})


def compression_kwargs(args) -> dict:
    """The callback's size rule: a global state budget (``--target-mean-state``) or the per-layer ``--tau``,
    and the window of the attempts (``--window``; default: the callback's, the first 10 % of the steps)."""
    rule = (
        {"tau": args.tau} if args.target_mean_state is None else {"target_mean_state": args.target_mean_state}
    )
    if args.window is not None:
        rule["window"] = tuple(args.window)
    return rule


def compressm_label(args, selection: str = "largest") -> str:
    """``compressm`` / ``compressm-<selection>``, with ``-w<start>-<end>`` when ``--window`` is given."""
    label = "compressm" if selection == "largest" else f"compressm-{selection}"
    if args.window is not None:
        label += "-w{:g}-{:g}".format(*args.window)
    return label


def run_compressm(args, data, command: str) -> None:
    """Only the CompreSSM runs (largest HSVs), e.g. for another ``--window``; scratch is the claim's."""
    rule = compression_kwargs(args)
    record = {"phase": "claim", "command": command, **rule}
    for seed in args.seeds:
        r = harness.train_run(
            args,
            data,
            seed=seed,
            callback_kwargs={**rule, "selection": "largest"},
            label=compressm_label(args),
        )
        append_line(args.out, {**r, **record})


def run_claim(args, data, command: str) -> None:
    rule = compression_kwargs(args)
    for seed in args.seeds:
        record = {"phase": "claim", "command": command, **rule}
        append_line(args.out, {**harness.train_run(args, data, seed=seed, label="full"), **record})
        comp = harness.train_run(
            args,
            data,
            seed=seed,
            callback_kwargs={**rule, "selection": "largest"},
            label=compressm_label(args),
        )
        append_line(args.out, {**comp, **record})
        scratch = harness.train_run(args, data, seed=seed, state_sizes=comp["state_sizes"], label="scratch")
        append_line(args.out, {**scratch, **record})
        if not args.no_ablation:
            run_ablation(args, data, command, seeds=[seed])


def run_ablation(args, data, command: str, seeds: list[int] | None = None) -> None:
    """The selection ablation alone: the compression rule of ``claim``, keeping the smallest / random states."""
    rule = compression_kwargs(args)
    record = {"phase": "claim", "command": command, **rule}
    for seed in args.seeds if seeds is None else seeds:
        for selection in ("smallest", "random"):
            r = harness.train_run(
                args,
                data,
                seed=seed,
                callback_kwargs={**rule, "selection": selection},
                label=compressm_label(args, selection),
            )
            append_line(args.out, {**r, **record})


# ------------------------------------------------------------------------------------------- summary


def top_k_mean(values: list[float], k: int = 3) -> float:
    return statistics.fmean(sorted(values, reverse=True)[:k]) if values else math.nan


def paired_ci(a: dict[int, float], b: dict[int, float], level: float = 0.95) -> dict:
    """Mean and ``level`` t-interval of ``a[seed] - b[seed]`` over the seeds both have."""
    from scipy import stats

    seeds = sorted(set(a) & set(b))
    diffs = [a[s] - b[s] for s in seeds]
    out = {"seeds": seeds, "diffs": diffs, "mean": math.nan, "low": math.nan, "high": math.nan, "p": math.nan}
    if len(diffs) < 2:
        return out
    mean, sd = statistics.fmean(diffs), statistics.stdev(diffs)
    half = stats.t.ppf(0.5 + level / 2, len(diffs) - 1) * sd / math.sqrt(len(diffs))
    p = float(stats.ttest_rel([a[s] for s in seeds], [b[s] for s in seeds]).pvalue) if sd > 0 else math.nan
    out.update(mean=mean, low=mean - half, high=mean + half, p=p, wins=sum(d > 0 for d in diffs))
    return out


def summarize(paths: list[str]) -> dict:
    runs = [json.loads(line) for p in paths for line in Path(p).read_text().splitlines() if line.strip()]
    by_label: dict[str, list[dict]] = {}
    for r in runs:
        by_label.setdefault(r["label"], []).append(r)
    commands = sorted({r["command"] for r in runs})
    print("commands:\n" + "\n".join(f"  {c}" for c in commands) + "\n")
    print("| method | seeds | test acc % mean ± std | top-3 mean | final mean n | train s/run |")
    print("|---|---|---|---|---|---|")
    rows = {}
    others = sorted((k for k in by_label if k not in CLAIM_LABELS), key=lambda k: (len(k), k))  # n4 < n16
    for label in [*CLAIM_LABELS, *others]:
        rs = by_label.get(label)
        if not rs:
            continue
        acc = [100 * r["accuracy"] for r in rs]
        sizes = [r["mean_state_size"] for r in rs]
        wall = [r["train_s"] for r in rs]
        sd = statistics.stdev(acc) if len(acc) > 1 else 0.0
        rows[label] = {"acc": acc, "sizes": sizes, "train_s": wall}
        print(
            f"| {label} | {len(rs)} | {statistics.fmean(acc):.2f} ± {sd:.2f} | {top_k_mean(acc):.2f} | "
            f"{statistics.fmean(sizes):.1f} | {statistics.fmean(wall):.1f} |"
        )
    result = {"commands": commands, "rows": rows}
    acc_of = {k: {r["seed"]: 100 * r["accuracy"] for r in v} for k, v in by_label.items()}
    pairs = [(k, "scratch") for k in acc_of if k.startswith("compressm") and "scratch" in acc_of]
    pairs += [(k, "full") for k in acc_of if k.startswith("compressm") and "full" in acc_of]
    for k in acc_of:  # the selection ablation against CompreSSM with the same window
        for selection in ("smallest", "random"):
            base = "compressm" + k[len(f"compressm-{selection}") :]
            if k.startswith(f"compressm-{selection}") and base in acc_of:
                pairs.append((base, k))
    for mine, other in pairs:
        ci = paired_ci(acc_of[mine], acc_of[other])
        result[f"{mine}_minus_{other}"] = ci
        if len(ci["seeds"]) > 1:
            print(
                f"\n{mine} - {other} (paired by seed, n={len(ci['seeds'])}): {ci['mean']:+.2f} points, "
                f"95% CI [{ci['low']:+.2f}, {ci['high']:+.2f}], p = {ci['p']:.3g}, "
                f"{mine} ahead on {ci['wins']}/{len(ci['seeds'])} seeds"
            )
    return result


# ---------------------------------------------------------------------------------------------- main


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--phase", choices=["scout", "claim", "ablation", "compressm"], default="claim")
    p.add_argument(
        "--summarize", nargs="+", metavar="JSONL", help="no training: print the table of these files"
    )
    p.add_argument("--summary-json", metavar="JSON", help="with --summarize: also write the summary here")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    p.add_argument("--sizes", type=int, nargs="+", default=[4, 8, 16, 32, 64, 256], help="scout: n per layer")
    p.add_argument("--tau", type=float, default=0.3, help="claim: discarded fraction of sum(HSV) per attempt")
    p.add_argument(
        "--target-mean-state",
        type=float,
        default=None,
        help="claim: a state budget per layer instead of --tau (the callback finds the tau that meets it at each "
        "attempt), so every selection ends at the same size",
    )
    p.add_argument(
        "--window",
        type=float,
        nargs=2,
        default=None,
        metavar=("START", "END"),
        help="fractions of max_steps holding the 4 attempts (default: the callback's 0 0.1)",
    )
    p.add_argument("--state-size", type=int, default=256, help="n0")
    p.add_argument("--hidden-size", type=int, default=32)
    p.add_argument("--layers", type=int, default=1)
    p.add_argument(
        "--block",
        choices=["paper", "layernorm"],
        default="paper",
        help="paper: the preset; layernorm: the preset with LRUConfig's language-modelling norm and init",
    )
    p.add_argument("--dropout", type=float, default=0.1)
    p.add_argument("--max-steps", type=int, default=1000)
    p.add_argument("--batch-size", type=int, default=50)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--warmup", type=float, default=0.1, help="warm-up fraction of max_steps (then cosine)")
    p.add_argument("--scan", default="sequential", choices=["sequential", "parallel"])
    p.add_argument("--max-train", type=int, default=None, help="keep the first examples (default: all 8000)")
    p.add_argument("--max-test", type=int, default=None, help="keep the first examples (default: all 2000)")
    p.add_argument(
        "--no-ablation", action="store_true", help="claim: skip the smallest/random selection runs"
    )
    p.add_argument("--threads", type=int, default=1)
    p.add_argument(
        "--out", default="benchmarks/results/paper_claim_runs.jsonl", help="JSONL file runs are appended to"
    )
    return p


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    if args.summarize:
        result = summarize(args.summarize)
        if args.summary_json:
            Path(args.summary_json).write_text(json.dumps(result, indent=2) + "\n")
        return
    torch.set_num_threads(args.threads)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    harness.model_config = paper_block_config  # the harness builds every model through this name
    data = harness.load_task("mnist1d", args.max_train, args.max_test)
    command = "python benchmarks/bench_paper_claim.py " + " ".join(sys.argv[1:] if argv is None else argv)
    print(
        f"mnist1d: {len(data['train'])} train / {len(data['test'])} test; paper block H={args.hidden_size} "
        f"x{args.layers}, n0={args.state_size}; {args.max_steps} steps of {args.batch_size}, lr {args.lr}; "
        f"torch {torch.__version__}, {args.threads} thread(s)",
        flush=True,
    )
    t0 = time.perf_counter()
    phases = {"scout": run_scout, "claim": run_claim, "ablation": run_ablation, "compressm": run_compressm}
    phases[args.phase](args, data, command)
    print(f"total {(time.perf_counter() - t0) / 60:.1f} min; runs appended to {args.out}", flush=True)


if __name__ == "__main__":
    main()
