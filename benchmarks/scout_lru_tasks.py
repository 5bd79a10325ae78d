"""Scouting for bench_lru_compression.py: where does LRU test accuracy still grow with the state size?

A compression benchmark only says something where quality grows with ``n``: if the task saturates
at ``n = 4``, every compressed model looks as good as the full one, whatever the method. This script
trains ``LRUForSequenceClassification`` from scratch (same Trainer code path as the benchmark) at
several state sizes with a fixed step budget and prints test accuracy per size.

    python benchmarks/scout_lru_tasks.py --task fmnist4 --sizes 2 4 8 16 64 --max-steps 600
    python benchmarks/scout_lru_tasks.py --task mnist1d --sizes 2 8 32 --max-steps 600 --max-test 2000

Every flag of bench_lru_compression.py that shapes the model or the training is accepted too.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch
from bench_lru_compression import build_parser, load_task, train_run


def main() -> None:
    parser = build_parser()
    parser.description = __doc__.splitlines()[0]
    parser.add_argument("--sizes", type=int, nargs="+", default=[2, 4, 8, 16, 64])
    parser.add_argument("--jsonl", default=None, help="append one JSON line per run here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    data = load_task(args.task, args.max_train, args.max_test)
    rows = []
    for n in args.sizes:
        for seed in args.seeds:
            args.state_size = n
            r = train_run(args, data, seed=seed, label=f"n={n}")
            r.update(
                task=args.task,
                n=n,
                hidden_size=args.hidden_size,
                layers=args.layers,
                r_min=args.r_min,
                r_max=args.r_max,
                max_phase=args.max_phase,
                lr=args.lr,
            )
            rows.append(r)
            if args.jsonl:
                with open(args.jsonl, "a") as f:
                    f.write(json.dumps(r) + "\n")
    print("\n| task | H x layers | n | seeds | test acc % | train s/run |\n|---|---|---|---|---|---|")
    for n in args.sizes:
        rs = [r for r in rows if r["n"] == n]
        accs = [100 * r["accuracy"] for r in rs]
        m = sum(accs) / len(accs)
        print(
            f"| {args.task} | {args.hidden_size}x{args.layers} | {n} | {len(rs)} | {m:.2f} ({', '.join(f'{a:.1f}' for a in accs)}) "
            f"| {sum(r['train_s'] for r in rs) / len(rs):.0f} |"
        )


if __name__ == "__main__":
    main()
