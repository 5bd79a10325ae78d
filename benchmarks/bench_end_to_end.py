"""End to end: a full-size run vs CompreSSM vs a model born small, on the default job (issue 14).

The default ``compressm-train`` job (byte-level Mamba on Shakespeare: hidden 128, 4 layers, d_state 64,
blocks of 128 bytes, batch 16, the CLI's compression defaults), shortened to ``--max-steps`` (the
compression window is a fraction of the run, so the schedule scales with it), trained three times in
this process through the same ``Trainer`` setup as the CLI (no evaluation, no checkpoints):

* **full**: no compression;
* **CompreSSM**: ``CompreSSMCallback`` with the CLI's settings;
* **born small**: no compression, built at CompreSSM's final per-layer sizes.

Load drift on a shared machine must not decide the comparison, so everything is measured in **process
CPU time** (``time.process_time``, one torch thread), with wall time and the load average beside it.
Printed per run: CPU time of ``trainer.train()`` and of its optimizer steps, median CPU time per step at
the final size; for CompreSSM the compression work (statistics steps over a plain step, planning +
surgery) from ``compressm_hf.trainer.timing.run_timing``. Then:

* measured end-to-end speed-up = CPU(full) / CPU(CompreSSM), whole ``trainer.train()``;
* ideal = CPU(full) / (the same steps at the sizes CompreSSM had at each step, each at the median step
  cost of a run at that size: full-size steps from the full run, final-size steps from the born-small run,
  intermediate sizes from the CompreSSM run itself; no compression work) -- what the schedule promises;
* measured / ideal (issue target >= 90 %), and the born-small speed-up (the bound for these final sizes).

    python benchmarks/bench_end_to_end.py --max-steps 300
    python benchmarks/bench_end_to_end.py --max-steps 300 --order born_small,full,compressm --born-sizes 22,23,21,23
    python benchmarks/bench_end_to_end.py --max-steps 30          # smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time

import torch
from transformers import Trainer, set_seed

from compressm_hf import find_reducible_layers
from compressm_hf.cli.train import build_model, make_callback, parse_args
from compressm_hf.data import byte_lm_splits, load_text
from compressm_hf.trainer.timing import StepTimer, run_timing


def _cli_args(output_dir: str, max_steps: int):
    return parse_args(
        [
            "--output_dir",
            output_dir,
            "--max_steps",
            str(max_steps),
            "--disable_tqdm",
            "true",
            "--eval_strategy",
            "no",
            "--save_strategy",
            "no",
            "--report_to",
            "none",
            "--logging_steps",
            str(max_steps),
        ]
    )


def run(variant: str, max_steps: int, state_sizes: list[int] | None = None) -> dict:
    """Train one variant ("full", "compressm", "born_small"); returns its measurements."""
    with tempfile.TemporaryDirectory() as tmp:
        model_args, comp_args, data_args, training_args = _cli_args(tmp, max_steps)
        set_seed(training_args.seed)
        splits = byte_lm_splits(
            load_text(data_args.dataset),
            block_size=data_args.block_size,
            validation_fraction=data_args.validation_fraction,
            max_train_blocks=data_args.max_train_blocks,
        )
        model = build_model(model_args)
        if state_sizes is not None:
            for layer, n in zip(find_reducible_layers(model), state_sizes):
                layer.resize_(int(n))
        tokens = training_args.per_device_train_batch_size * data_args.block_size
        timer = StepTimer(model, tokens)
        callbacks = [timer]
        compress_cb = make_callback(comp_args, seed=training_args.seed) if variant == "compressm" else None
        if compress_cb is not None:
            callbacks.append(compress_cb)
        trainer = Trainer(model=model, args=training_args, train_dataset=splits["train"], callbacks=callbacks)
        load_before = os.getloadavg()
        wall0, cpu0 = time.perf_counter(), time.process_time()
        trainer.train()
        cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
        timing = run_timing(
            timer.records, compress_cb.history if compress_cb else [], skip_first=timer.skip_first
        )
        return {
            "variant": variant,
            "final_sizes": [int(layer.state_size) for layer in find_reducible_layers(model)],
            "train_cpu_s": cpu,
            "train_wall_s": wall,
            "load_before": load_before,
            "load_after": os.getloadavg(),
            "records": timer.records,
            "timing": timing,
        }


def _median_cpu_by_size(result: dict) -> dict[int, float]:
    """Median step CPU time per total state size: clean steps (after the warm-up, no statistics), or all
    steps of a size that had no clean one."""
    clean: dict[int, list[float]] = {}
    every: dict[int, list[float]] = {}
    for r in result["records"]:
        every.setdefault(r["total_state_size"], []).append(r["cpu_seconds"])
        if r["step"] > 2 and not r["statistics"]:
            clean.setdefault(r["total_state_size"], []).append(r["cpu_seconds"])
    return {size: statistics.median(clean.get(size) or v) for size, v in every.items()}


def ideal_cpu(full: dict, comp: dict, born: dict) -> float:
    """CPU seconds of CompreSSM's steps at their sizes, without compression work (see the docstring),
    scaled by the full run's ratio of whole-train to step CPU time (data loading, logging)."""
    cost = _median_cpu_by_size(comp)
    cost.update(_median_cpu_by_size(born))
    cost.update(_median_cpu_by_size(full))
    steps = sum(cost[r["total_state_size"]] for r in comp["records"])
    full_steps = sum(r["cpu_seconds"] for r in full["records"])
    return steps * full["train_cpu_s"] / full_steps


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--max-steps", type=int, default=300)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", default=None, help="also write the results (without per-step records) here")
    p.add_argument(
        "--order",
        default="compressm,full,born_small",
        help="run order (comma-separated); born_small before compressm needs --born-sizes",
    )
    p.add_argument(
        "--born-sizes", default=None, help="per-layer sizes of the born-small model, e.g. 22,23,21,23"
    )
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    order = args.order.split(",")
    if sorted(order) != ["born_small", "compressm", "full"]:
        p.error(f"--order must name born_small, compressm and full once each, got {args.order!r}")
    born_sizes = None if args.born_sizes is None else [int(n) for n in args.born_sizes.split(",")]
    if born_sizes is None and order.index("born_small") < order.index("compressm"):
        p.error("--order runs born_small before compressm: give --born-sizes")

    results = {}
    for variant in order:
        sizes = None
        if variant == "born_small":
            sizes = born_sizes or results["compressm"]["final_sizes"]
        results[variant] = run(variant, args.max_steps, sizes)
    full, comp, born = results["full"], results["compressm"], results["born_small"]
    if born["final_sizes"] != comp["final_sizes"]:
        print(f"note: born-small sizes {born['final_sizes']} differ from CompreSSM's {comp['final_sizes']}")

    print(
        f"\n## End to end, default job, {args.max_steps} steps, {args.threads} thread(s), CPU time, "
        f"order {args.order}\n"
    )
    print("| run | final sizes | train CPU s | train wall s | CPU s/step at final size | load avg (1 min) |")
    print("|---|---|---|---|---|---|")
    for r in (full, comp, born):
        final = r["timing"]["final_size"]["cpu_s_per_step"]
        load = f"{r['load_before'][0]:.1f} -> {r['load_after'][0]:.1f}"
        print(
            f"| {r['variant']} | {r['final_sizes']} | {r['train_cpu_s']:.1f} | {r['train_wall_s']:.1f} | "
            f"{final:.3f} | {load} |"
        )
    work = comp["timing"]["compression_work"]
    measured = full["train_cpu_s"] / comp["train_cpu_s"]
    ideal = full["train_cpu_s"] / ideal_cpu(full, comp, born)
    print(
        f"\ncompression work: {work['total_cpu_s']:.2f} s CPU = {work['fraction_of_run']:.2%} of the run's steps "
        f"(statistics: {work['statistics_steps']} steps, {work['statistics_cpu_s']:.2f} s over a plain step; "
        f"planning + surgery: {work['events']} events, {work['planning_and_surgery_cpu_s']:.2f} s)"
    )
    print(
        f"end-to-end speed-up (CPU time): measured x{measured:.3f}, ideal x{ideal:.3f}, "
        f"measured / ideal = {measured / ideal:.1%}; born small x{full['train_cpu_s'] / born['train_cpu_s']:.3f}"
    )
    print(
        f"(wall clock, load-dependent: full {full['train_wall_s']:.1f} s, CompreSSM {comp['train_wall_s']:.1f} s, "
        f"born small {born['train_wall_s']:.1f} s)"
    )
    if args.json:
        slim = [{k: v for k, v in r.items() if k != "records"} for r in (full, comp, born)]
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump({"max_steps": args.max_steps, "threads": args.threads, "runs": slim}, fh, indent=2)


if __name__ == "__main__":
    main()
