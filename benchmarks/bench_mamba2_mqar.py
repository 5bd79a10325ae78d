"""CompreSSM on Mamba-2 where the state is the capacity: multi-query associative recall (MQAR).

``--architecture mamba`` runs the same phases on Mamba-1 (``CompreSSMMambaForCausalLM``, same hidden size, layers
and d_state), for the comparison of the two architectures on one task.

MQAR (Zoology, arXiv 2312.04927; ``compressm_hf.data_mqar``, generated offline from a seed): a context of
key-value pairs, then queries of its keys; a model must recall the value bound to each queried key, and a
recurrent model's recall accuracy grows with its state size. The metric is recall accuracy on held-out
sequences (argmax at every answer position), read once at the end of training.

Two phases, each appending one JSON line per training run to ``--out`` (an interrupted run keeps what it
finished):

* ``--phase scout``: ``CompreSSMMamba2ForCausalLM`` from scratch at every d_state of ``--sizes``; shows where
  accuracy grows with d_state.
* ``--phase claim``: per seed, ``full`` (d_state ``--n0``), ``compressm-w<start>-<end>``
  (``CompreSSMCallback(target_mean_state=..., window=...)`` in the stock ``Trainer``: the budget makes the
  final sizes exact, 4 attempts in ``--window``), and ``scratch`` (from scratch at CompreSSM's exact per-layer
  final sizes, same seed, same data, same steps).
* ``--summarize FILE...``: no training; the table (mean ± std, top-3 mean, final mean d_state, train s/run)
  and the 95 % t-interval of the paired (by seed) CompreSSM − scratch and CompreSSM − full differences:
  ``bench_paper_claim.summarize``.

Training: the stock ``transformers.Trainer`` (AdamW, linear warm-up then cosine, clipping 1.0), batches of
fresh MQAR sequences (``--num-train``, drawn from the seed of the run), loss only at the answer positions.

Examples::

    python benchmarks/bench_mamba2_mqar.py --phase scout --sizes 2 4 8 16 32 --seeds 0 1 \\
        --out benchmarks/results/mamba2_mqar_scout.jsonl
    python benchmarks/bench_mamba2_mqar.py --phase claim --n0 32 --target-mean-state 8 --seeds 0 1 2 \\
        --out benchmarks/results/mamba2_mqar_runs.jsonl
    python benchmarks/bench_mamba2_mqar.py --summarize benchmarks/results/mamba2_mqar_runs.jsonl
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_paper_claim as claim  # append_line, summarize: the same JSONL records and table
from _timing import probe


def mqar_kwargs(args) -> dict:
    """The task's shape, shared by the train and test generators."""
    return dict(
        vocab_size=args.vocab_size, num_kv_pairs=args.kv_pairs, seq_len=args.seq_len, power_a=args.power_a
    )


def build_model(args, state_sizes: list[int]):
    """A fresh LM of ``args.architecture`` (``mamba2`` or ``mamba``: Mamba-1, same hidden size and layers)."""
    if args.architecture == "mamba":
        from compressm_hf.modeling.mamba import CompreSSMMambaConfig, CompreSSMMambaForCausalLM

        return CompreSSMMambaForCausalLM(
            CompreSSMMambaConfig(
                vocab_size=args.vocab_size,
                hidden_size=args.hidden_size,
                num_hidden_layers=args.layers,
                state_sizes=list(state_sizes),
                expand=2,
                pad_token_id=0,
                bos_token_id=0,
                eos_token_id=0,
            )
        )
    from compressm_hf.modeling.mamba2 import CompreSSMMamba2ForCausalLM

    return CompreSSMMamba2ForCausalLM(model_config(args, state_sizes))


def model_config(args, state_sizes: list[int]):
    """The Mamba-2 config: ``args.heads`` heads of ``2 * hidden / heads`` (expand 2), one chunk per sequence."""
    from compressm_hf.modeling.mamba2 import CompreSSMMamba2Config

    return CompreSSMMamba2Config(
        vocab_size=args.vocab_size,
        hidden_size=args.hidden_size,
        num_heads=args.heads,
        head_dim=2 * args.hidden_size // args.heads,  # expand 2
        n_groups=args.n_groups,
        num_hidden_layers=args.layers,
        state_sizes=list(state_sizes),
        chunk_size=args.seq_len,
        pad_token_id=0,
        bos_token_id=0,
        eos_token_id=0,
    )


@torch.no_grad()
def recall(model, test, batch_size: int = 250) -> float:
    """Recall accuracy of ``model`` on the ``test`` arrays (``compressm_hf.data_mqar.recall_accuracy``)."""
    from compressm_hf.data_mqar import recall_accuracy

    model.eval()
    ids = torch.as_tensor(test["input_ids"])
    logits = torch.cat(
        [model(input_ids=ids[i : i + batch_size]).logits for i in range(0, len(ids), batch_size)]
    )
    return recall_accuracy(logits.numpy(), test["labels"])


def train_run(
    args, *, seed: int, state_sizes: list[int], callback_kwargs: dict | None = None, label: str
) -> dict:
    """Train one model in the Trainer; its recall accuracy, final sizes and timings.

    ``callback_kwargs`` (a dict) adds ``CompreSSMCallback(**callback_kwargs)``.
    """
    from transformers import PrinterCallback, Trainer, TrainingArguments, set_seed

    from compressm_hf.data_mqar import mqar_arrays, mqar_dataset

    train = mqar_dataset(args.num_train, seed=1000 + seed, **mqar_kwargs(args)).with_format("torch")
    test = mqar_arrays(args.num_test, seed=1, **mqar_kwargs(args))  # one test set for every run
    set_seed(seed)
    model = build_model(args, state_sizes)
    callbacks = []
    if callback_kwargs is not None:
        from compressm_hf.trainer.callback import CompreSSMCallback

        callbacks.append(CompreSSMCallback(seed=seed, **callback_kwargs))
    gflops = probe()
    with tempfile.TemporaryDirectory(prefix="bench_mqar_") as out_dir:
        targs = TrainingArguments(
            output_dir=out_dir,
            max_steps=args.max_steps,
            per_device_train_batch_size=args.batch_size,
            learning_rate=args.lr,
            weight_decay=args.weight_decay,
            lr_scheduler_type="cosine",
            warmup_steps=max(1, round(args.warmup * args.max_steps)),
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
        trainer = Trainer(model=model, args=targs, train_dataset=train, callbacks=callbacks)
        trainer.remove_callback(PrinterCallback)
        t0, c0 = time.perf_counter(), time.process_time()
        out = trainer.train()
        train_s, train_cpu_s = time.perf_counter() - t0, time.process_time() - c0
        report_path = Path(out_dir) / "compression_report.json"
        report = json.loads(report_path.read_text()) if callbacks and report_path.is_file() else None
    accuracy = recall(model, test)
    sizes = [int(s) for s in model.config.state_sizes]
    events = [
        {k: ev.get(k) for k in ("kind", "step", "sizes_before", "sizes_after", "wall_time_s")}
        for ev in (report or {}).get("events", [])
    ]
    result = {
        "label": label,
        "architecture": args.architecture,
        "seed": seed,
        "max_steps": args.max_steps,
        "accuracy": accuracy,
        "train_loss": float(out.training_loss),
        "initial_state_sizes": list(state_sizes),
        "state_sizes": sizes,
        "mean_state_size": float(np.mean(sizes)),
        "train_s": train_s,
        "train_cpu_s": train_cpu_s,
        "probe_gflops": gflops,
        "events": events,
    }
    print(
        f"  [{label:>20s} seed {seed}] recall {accuracy:.4f}  loss {result['train_loss']:.3f}  sizes {sizes}  "
        f"train {train_s:6.1f}s (cpu {train_cpu_s:6.1f}s)",
        flush=True,
    )
    return result


def task_record(args, command: str, phase: str) -> dict:
    return {"phase": phase, "command": command, "task": {**mqar_kwargs(args), "num_train": args.num_train}}


def run_scout(args, command: str) -> None:
    for seed in args.seeds:
        for n in args.sizes:
            r = train_run(args, seed=seed, state_sizes=[n] * args.layers, label=f"scratch-n{n}")
            claim.append_line(args.out, {**r, **task_record(args, command, "scout"), "n": n})


def run_claim(args, command: str) -> None:
    if args.target_mean_state is None:
        raise SystemExit("--phase claim needs --target-mean-state (the per-layer state budget of CompreSSM)")
    rule = {
        "target_mean_state": args.target_mean_state,
        "window": tuple(args.window),
        "statistics_steps": args.statistics_steps,
    }
    label = "compressm-w{:g}-{:g}".format(*args.window)
    full_sizes = [args.n0] * args.layers
    for seed in args.seeds:
        record = {**task_record(args, command, "claim"), **rule}
        claim.append_line(
            args.out, {**train_run(args, seed=seed, state_sizes=full_sizes, label="full"), **record}
        )
        comp = train_run(args, seed=seed, state_sizes=full_sizes, callback_kwargs=rule, label=label)
        claim.append_line(args.out, {**comp, **record})
        scratch = train_run(args, seed=seed, state_sizes=comp["state_sizes"], label="scratch")
        claim.append_line(args.out, {**scratch, **record})


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--phase", choices=["scout", "claim"], default="claim")
    p.add_argument(
        "--architecture",
        choices=["mamba2", "mamba"],
        default="mamba2",
        help="mamba2 (default) or mamba (Mamba-1: same hidden size, layers and d_state; --heads/--n-groups unused)",
    )
    p.add_argument(
        "--summarize", nargs="+", metavar="JSONL", help="no training: print the table of these files"
    )
    p.add_argument("--summary-json", metavar="JSON", help="with --summarize: also write the summary here")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--sizes", type=int, nargs="+", default=[2, 4, 8, 16, 32], help="scout: d_state per layer")
    p.add_argument("--n0", type=int, default=32, help="claim: d_state of full and of CompreSSM at the start")
    p.add_argument(
        "--target-mean-state", type=float, default=None, help="claim: CompreSSM's mean d_state budget"
    )
    p.add_argument("--window", type=float, nargs=2, default=[0.05, 0.2], metavar=("START", "END"))
    p.add_argument("--statistics-steps", type=int, default=8)
    p.add_argument("--vocab-size", type=int, default=64)
    p.add_argument("--kv-pairs", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--power-a", type=float, default=0.01)
    p.add_argument("--num-train", type=int, default=40_000)
    p.add_argument("--num-test", type=int, default=1_000)
    p.add_argument("--hidden-size", type=int, default=64)
    p.add_argument("--heads", type=int, default=8, help="mamba2: head_dim = 2 * hidden / heads (expand 2)")
    p.add_argument("--n-groups", type=int, default=1, help="mamba2: groups sharing B and C")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--max-steps", type=int, default=600)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--warmup", type=float, default=0.1, help="warm-up fraction of max_steps (then cosine)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default="benchmarks/results/mamba2_mqar_runs.jsonl", help="JSONL file runs go to")
    return p


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    if args.summarize:
        result = claim.summarize(args.summarize)
        if args.summary_json:
            Path(args.summary_json).write_text(json.dumps(result, indent=2) + "\n")
        return
    torch.set_num_threads(args.threads)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    command = "python benchmarks/bench_mamba2_mqar.py " + " ".join(sys.argv[1:] if argv is None else argv)
    shape = (
        f"Mamba-2 hidden {args.hidden_size} x{args.layers}, {args.heads} heads, {args.n_groups} group(s)"
        if args.architecture == "mamba2"
        else f"Mamba-1 hidden {args.hidden_size} x{args.layers}, expand 2"
    )
    print(
        f"MQAR {mqar_kwargs(args)}; {shape}; {args.max_steps} steps of {args.batch_size}, lr {args.lr}; "
        f"torch {torch.__version__}, {args.threads} thread(s)",
        flush=True,
    )
    t0 = time.perf_counter()
    {"scout": run_scout, "claim": run_claim}[args.phase](args, command)
    print(f"total {(time.perf_counter() - t0) / 60:.1f} min; runs appended to {args.out}", flush=True)


if __name__ == "__main__":
    main()
