"""CompreSSM at CPU scale: does compressing an LRU early in training keep the full model's accuracy?

The paper's claim (arXiv 2510.02823, LRU experiments): a model trained at state size ``n0`` and
compressed by balanced truncation in the first 10% of training (4 attempts, keep the smallest rank
holding ``1 - tau`` of the Hankel-singular-value sum) ends close to the full model, clearly above a
model trained *from scratch* at the compressed sizes, and trains faster than the full one.

This script trains, through the stock ``transformers.Trainer`` and with the same step budget:

* ``full``          -- ``LRUForSequenceClassification`` at ``n0`` states per layer;
* ``compressm``     -- the same model + ``CompreSSMCallback(tau, selection="largest")``
                       (default schedule: attempts at 2.5/5/7.5/10% of ``max_steps``);
* ``scratch``       -- from scratch at the per-layer sizes CompreSSM ended with (same seed),
                       ``LRUConfig(state_sizes=...)``;
* ``compressm-smallest`` / ``compressm-random`` -- the selection ablation (paper App. C.1):
                       same ``tau`` (hence same ranks), but keep the *smallest* / random balanced
                       states instead of the dominant ones.

Data are ``datasets.Dataset`` objects (``compressm_hf.data``), the metric is the offline
``evaluate`` accuracy module (``compressm_hf.metrics.load_metric``), the schedule is linear
warm-up + cosine decay. Test accuracy is read once, at the end of training (no model selection).

Examples::

    python benchmarks/bench_lru_compression.py --quick                      # ~1 min smoke run
    python benchmarks/bench_lru_compression.py --seeds 0 1 2 --out runs.json  # the full benchmark
    python benchmarks/bench_lru_compression.py --no-ablation --tau 0.1

Defaults (chosen by ``benchmarks/scout_lru_tasks.py``; results in
``benchmarks/RESULTS_lru_compression.md``): sequential Fashion-MNIST pooled 4x4 (49 steps, first
20k training / 2k test images), a 2-layer LRU with ``H = 32``, ``n0 = 16``, 500 steps of 64,
AdamW lr 4e-3 with 10% linear warm-up + cosine, ring init ``r in [0.5, 0.99]``,
``max_phase = pi/10``. At that budget accuracy rises steeply from ``n = 1`` to ``n = 4`` and is flat
from ``n = 16`` to ``n = 64``, so ``n0 = 16`` and ``tau = 0.3`` (final ~2 states, 8x) put the
compressed size where from-scratch training *does* lose accuracy. The short sequences want a
faster-forgetting ring than the paper's ``[0.9, 0.999]``. ``--scan sequential`` (default) and
``--threads 1``: on the shared (oversubscribed) 2-core machine 2 threads ran ~3.6x slower per
step than 1, and the chunked parallel scan was ~15% slower than the loop at L = 49.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

# ----------------------------------------------------------------------------------------------- data


def load_task(task: str, max_train: int | None, max_test: int | None):
    """A ``datasets.DatasetDict`` with ``train``/``test``; ``inputs_embeds`` (L, 1), ``labels``."""
    from datasets import Array2D

    from compressm_hf.data import fashion_mnist_splits, mnist1d_splits

    if task.startswith("fmnist"):  # fmnist4 -> pool 4 (49 steps), fmnist2 -> pool 2 (196 steps)
        pool = int(task[len("fmnist") :] or 1)
        ds = fashion_mnist_splits(max_train=max_train, max_test=max_test, pool=pool)
    elif task == "mnist1d":
        ds = mnist1d_splits(num_samples=10_000)
        if max_train is not None:
            ds["train"] = ds["train"].select(range(min(max_train, len(ds["train"]))))
        if max_test is not None:
            ds["test"] = ds["test"].select(range(min(max_test, len(ds["test"]))))
    else:
        raise ValueError(f"unknown task {task!r} (fmnist1, fmnist2, fmnist4, fmnist7, mnist1d)")
    # A fixed-shape Array2D feature: the torch formatter then converts whole numpy blocks. Left as the
    # nested-list feature that ``compressm_hf.data`` writes, every pixel becomes its own torch.tensor
    # call and data loading takes ~75% of each training step at these model sizes.
    seq_len = len(ds["train"][0]["inputs_embeds"])
    ds = ds.cast_column("inputs_embeds", Array2D(shape=(seq_len, 1), dtype="float32"))
    ds.set_format("torch")
    return ds


# ---------------------------------------------------------------------------------------------- model


def model_config(args, num_labels: int, state_sizes: list[int] | None = None):
    from compressm_hf.modeling.lru import LRUConfig

    return LRUConfig(
        input_size=1,
        num_labels=num_labels,
        hidden_size=args.hidden_size,
        num_hidden_layers=args.layers,
        state_size=args.state_size,
        state_sizes=state_sizes,
        r_min=args.r_min,
        r_max=args.r_max,
        max_phase=args.max_phase,
        hidden_dropout=args.dropout,
        classifier_pooling="mean",
        scan_implementation=args.scan,
    )


def count_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


# ------------------------------------------------------------------------------------------- training


def train_run(
    args,
    data,
    *,
    seed: int,
    state_sizes: list[int] | None = None,
    callback_kwargs: dict | None = None,
    max_steps: int | None = None,
    label: str = "",
    keep_models: dict | None = None,
) -> dict:
    """Train one model with the Trainer and return its test metrics, sizes and timings.

    ``callback_kwargs`` (a dict, possibly empty) adds a ``CompreSSMCallback(**callback_kwargs)``.
    """
    from transformers import PrinterCallback, Trainer, TrainingArguments, set_seed

    from compressm_hf.metrics import load_metric
    from compressm_hf.modeling.lru import LRUForSequenceClassification

    max_steps = max_steps or args.max_steps
    num_labels = max(int(y) for y in data["train"].with_format(None)["labels"]) + 1
    set_seed(seed)
    model = LRUForSequenceClassification(model_config(args, num_labels, state_sizes))
    params_before = count_params(model)
    accuracy = load_metric("accuracy")

    def compute_metrics(eval_pred):
        logits, labels = eval_pred
        return accuracy.compute(predictions=np.argmax(logits, axis=-1), references=labels)

    callbacks = []
    if callback_kwargs is not None:
        from compressm_hf.trainer.callback import CompreSSMCallback

        callbacks.append(CompreSSMCallback(seed=seed, **callback_kwargs))

    with tempfile.TemporaryDirectory(prefix="bench_lru_") as out_dir:
        targs = TrainingArguments(
            output_dir=out_dir,
            max_steps=max_steps,
            per_device_train_batch_size=args.batch_size,
            per_device_eval_batch_size=512,
            learning_rate=args.lr,
            weight_decay=args.weight_decay,
            lr_scheduler_type="cosine",
            warmup_steps=max(1, round(args.warmup * max_steps)),
            max_grad_norm=1.0,
            seed=seed,
            data_seed=seed,
            use_cpu=True,
            report_to="none",
            eval_strategy="no",
            save_strategy="no",
            logging_strategy="no",
            disable_tqdm=True,
            dataloader_num_workers=0,
        )
        trainer = Trainer(
            model=model,
            args=targs,
            train_dataset=data["train"],
            eval_dataset=data["test"],
            compute_metrics=compute_metrics,
            callbacks=callbacks,
        )
        trainer.remove_callback(PrinterCallback)  # no per-run log dicts on stdout
        t0 = time.perf_counter()
        train_out = trainer.train()
        train_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        metrics = trainer.evaluate()
        eval_s = time.perf_counter() - t0
        report = None
        report_path = Path(out_dir) / "compression_report.json"
        if callbacks and report_path.is_file():
            report = json.loads(report_path.read_text())

    sizes = [int(s) for s in model.config.state_sizes]
    events = []
    if report is not None:
        for ev in report.get("events", []):
            events.append(
                {k: ev.get(k) for k in ("kind", "step", "sizes_before", "sizes_after", "wall_time_s")}
            )
    result = {
        "label": label,
        "seed": seed,
        "max_steps": max_steps,
        "accuracy": float(metrics["eval_accuracy"]),
        "eval_loss": float(metrics["eval_loss"]),
        "train_loss": float(train_out.training_loss),
        "state_sizes": sizes,
        "mean_state_size": float(np.mean(sizes)),
        "params_initial": params_before,
        "params_final": count_params(model),
        "train_s": train_s,
        "eval_s": eval_s,
        "events": events,
        "compression_s": float(sum(e.get("wall_time_s") or 0.0 for e in events)),
    }
    print(
        f"  [{label:>18s} seed {seed}] acc {result['accuracy']:.4f}  sizes {sizes}  "
        f"train {train_s:6.1f}s  eval {eval_s:4.1f}s",
        flush=True,
    )
    if keep_models is not None and label not in keep_models:
        keep_models[label] = model
    return result


def interleaved_step_time(models: dict, data, batch_size: int, repeats: int = 12) -> dict:
    """Median seconds of one training step (forward + backward + AdamW step) per trained model.

    The models take turns (round robin, same batch), so load from other processes on a shared
    machine hits them alike; the Trainer wall-clock of separate runs does not have that property.
    """
    batch = data["train"][:batch_size]
    x, y = batch["inputs_embeds"], batch["labels"]
    opts = {k: torch.optim.AdamW(m.parameters(), lr=0.0) for k, m in models.items()}
    times: dict[str, list[float]] = {k: [] for k in models}
    for rep in range(repeats + 2):
        for k, m in models.items():
            m.train()
            t0 = time.perf_counter()
            m(inputs_embeds=x, labels=y).loss.backward()
            opts[k].step()
            opts[k].zero_grad(set_to_none=True)
            if rep >= 2:  # two warm-up rounds
                times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


# -------------------------------------------------------------------------------------------- tables


def mean_std(xs: list[float]) -> tuple[float, float]:
    if not xs:
        return math.nan, math.nan
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def summary_rows(runs: list[dict], methods: list[str]) -> list[dict]:
    rows = []
    for m in methods:
        rs = [r for r in runs if r["label"] == m]
        if not rs:
            continue
        acc = mean_std([100 * r["accuracy"] for r in rs])
        size = mean_std([r["mean_state_size"] for r in rs])
        wall = mean_std([r["train_s"] for r in rs])
        rows.append(
            {
                "method": m,
                "n_runs": len(rs),
                "acc_mean": acc[0],
                "acc_std": acc[1],
                "size_mean": size[0],
                "size_std": size[1],
                "sizes": [r["state_sizes"] for r in rs],
                "params_final": statistics.fmean(r["params_final"] for r in rs),
                "train_s_mean": wall[0],
                "train_s_std": wall[1],
            }
        )
    return rows


def markdown_table(rows: list[dict], title: str) -> str:
    lines = [
        f"**{title}**",
        "",
        "| method | runs | test acc % (mean ± std) | final mean state size | final sizes per seed | params | train wall s/run |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        sizes = "; ".join(",".join(str(s) for s in ss) for ss in r["sizes"])
        lines.append(
            f"| {r['method']} | {r['n_runs']} | {r['acc_mean']:.2f} ± {r['acc_std']:.2f} | "
            f"{r['size_mean']:.1f} ± {r['size_std']:.1f} | {sizes} | {r['params_final']:.0f} | "
            f"{r['train_s_mean']:.1f} ± {r['train_s_std']:.1f} |"
        )
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- main


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--task", default="fmnist4", help="fmnist4 (49 steps), fmnist2 (196), fmnist7 (16), mnist1d"
    )
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--max-steps", type=int, default=500)
    p.add_argument("--tau", type=float, default=0.3, help="discarded fraction of sum(HSV) per attempt")
    p.add_argument("--state-size", type=int, default=16, help="n0, the initial states per layer")
    p.add_argument("--hidden-size", type=int, default=32)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=4e-3)
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--warmup", type=float, default=0.1, help="warm-up fraction of max_steps (then cosine)")
    p.add_argument("--dropout", type=float, default=0.0)
    p.add_argument("--r-min", type=float, default=0.5)
    p.add_argument("--r-max", type=float, default=0.99)
    p.add_argument("--max-phase", type=float, default=math.pi / 10)
    p.add_argument(
        "--scan",
        default="sequential",
        choices=["sequential", "parallel"],
        help="LRU scan; at L=49 on one CPU thread the sequential loop is ~15%% faster",
    )
    p.add_argument("--max-train", type=int, default=20_000)
    p.add_argument("--max-test", type=int, default=2_000)
    p.add_argument("--no-ablation", action="store_true", help="skip the smallest/random selection runs")
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch.set_num_threads (1: on a busy 2-core box, 2 threads ran 3.6x slower per step)",
    )
    p.add_argument("--quick", action="store_true", help="tiny smoke version (~1 min)")
    p.add_argument("--out", type=str, default=None, help="write all runs + summaries as JSON here")
    p.add_argument(
        "--merge",
        nargs="+",
        default=None,
        metavar="JSON",
        help="no training: merge the runs of earlier --out files (e.g. one process per seed) and print the tables",
    )
    return p


def print_tables(runs: list[dict], args, cmd: str, total_s: float, ablation: bool) -> tuple[list, list]:
    main_rows = summary_rows(runs, ["full", "compressm", "scratch"])
    abl_rows = summary_rows(runs, ["compressm", "compressm-smallest", "compressm-random"])
    print()
    print(f"`{cmd}`  (total {total_s / 60:.1f} min)")
    print()
    title = f"CompreSSM vs full vs from-scratch ({args.task}, n0={args.state_size}, tau={args.tau}, {args.max_steps} steps)"
    print(markdown_table(main_rows, title))
    if ablation:
        print()
        print(markdown_table(abl_rows, f"Selection ablation (same tau={args.tau}, same seeds)"))
    return main_rows, abl_rows


def print_step_times(step_s: dict, seed: int) -> None:
    ref = step_s.get("full")
    print()
    print(f"**Controlled per-step training time (trained models of seed {seed}, interleaved, median)**")
    print()
    print("| model | s/step | vs full |")
    print("|---|---|---|")
    for k, v in step_s.items():
        print(f"| {k} | {v:.4f} | {v / ref:.2f}x |" if ref else f"| {k} | {v:.4f} | - |")


def merge(paths: list[str], out: str | None) -> dict:
    parts = [json.loads(Path(p).read_text()) for p in paths]
    runs = [r for part in parts for r in part["runs"]]
    args = argparse.Namespace(**parts[0]["args"])
    args.seeds = sorted({r["seed"] for r in runs})
    cmds = [part["command"] for part in parts]
    total_s = sum(part["total_s"] for part in parts)  # summed over the parts (they may have run in parallel)
    ablation = any(r["label"].startswith("compressm-") for r in runs)
    print("merged from:\n" + "\n".join(f"  {c}" for c in cmds))
    main_rows, abl_rows = print_tables(runs, args, " + ".join(cmds), total_s, ablation)
    for part in parts:
        if part.get("step_time_s"):
            print_step_times(part["step_time_s"], part["args"]["seeds"][0])
    result = {
        "commands": cmds,
        "args": vars(args),
        "total_s": total_s,
        "runs": runs,
        "summary": main_rows,
        "ablation": abl_rows if ablation else None,
        "step_time_s": {str(p["args"]["seeds"][0]): p.get("step_time_s") for p in parts},
    }
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(result, indent=2))
        print(f"\nwrote {out}")
    return result


def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    if args.merge:
        return merge(args.merge, args.out)
    if args.quick:
        args.seeds = args.seeds[:1]
        args.max_steps = min(args.max_steps, 40)
        args.max_train, args.max_test = 2_000, 500
        args.state_size = min(args.state_size, 16)
    torch.set_num_threads(args.threads)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()

    data = load_task(args.task, args.max_train, args.max_test)
    seq_len = int(data["train"][0]["inputs_embeds"].shape[0])
    print(
        f"task {args.task}: {len(data['train'])} train / {len(data['test'])} test, L={seq_len}; "
        f"LRU H={args.hidden_size} x{args.layers} layers, n0={args.state_size}; {args.max_steps} steps of "
        f"{args.batch_size}; tau={args.tau}; torch {torch.__version__}, {args.threads} threads, "
        f"{platform.machine()}",
        flush=True,
    )
    ckw = {"tau": args.tau}
    runs: list[dict] = []
    t_all = time.perf_counter()
    models: dict = {}
    for seed in args.seeds:
        keep = models if seed == args.seeds[0] else None
        runs.append(train_run(args, data, seed=seed, label="full", keep_models=keep))
        comp = train_run(
            args,
            data,
            seed=seed,
            callback_kwargs={**ckw, "selection": "largest"},
            label="compressm",
            keep_models=keep,
        )
        runs.append(comp)
        runs.append(
            train_run(
                args, data, seed=seed, state_sizes=comp["state_sizes"], label="scratch", keep_models=keep
            )
        )
        if not args.no_ablation:
            for sel in ("smallest", "random"):
                runs.append(
                    train_run(
                        args,
                        data,
                        seed=seed,
                        callback_kwargs={**ckw, "selection": sel},
                        label=f"compressm-{sel}",
                    )
                )
    total_s = time.perf_counter() - t_all

    cmd = "python benchmarks/bench_lru_compression.py " + " ".join(sys.argv[1:] if argv is None else argv)
    main_rows, abl_rows = print_tables(runs, args, cmd, total_s, not args.no_ablation)
    step_s = interleaved_step_time(models, data, args.batch_size)
    print_step_times(step_s, args.seeds[0])
    result = {
        "step_time_s": step_s,
        "command": cmd,
        "args": vars(args),
        "seq_len": seq_len,
        "torch": torch.__version__,
        "total_s": total_s,
        "runs": runs,
        "summary": main_rows,
        "ablation": abl_rows if not args.no_ablation else None,
    }
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2))
        print(f"\nwrote {args.out}")
    return result


if __name__ == "__main__":
    main()
