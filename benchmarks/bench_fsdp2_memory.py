"""FSDP2 vs DDP under CompreSSM cuts: per-rank memory and step time, before the first cut and after the last
(issue 16, item 4).

One ``torchrun`` launch per engine (2 gloo CPU processes, one thread each), run back to back (the order
alternates when ``--repeats`` > 1). Each launch trains the default model of ``compressm-train`` (its
``ModelArguments`` defaults: byte-level Mamba, hidden 128, 4 layers, d_state 64, expand 2, conv 4; the CLI's
AdamW lr 3e-3, weight decay 0.01, cosine schedule with a 10 % warm-up) on the built-in Shakespeare text in
blocks of 128 bytes, a global batch of 16 blocks (8 per rank), for ``--steps`` (260) optimizer steps, in a
plain loop. Two cuts (``--cuts``, default after steps 24 and 26: inside the first 10 %) are made by
``compressm_hf.trainer.distributed_cut.cut_in_training`` with ``RankPolicy(tau=--tau)`` (0.12: 64 -> ~32
states over the two cuts); the selective layers collect surrogate statistics over the 2 steps up to each cut.

* ``ddp``: the model wrapped in ``DistributedDataParallel``; ``cut_in_training`` plans on rank 0 (the statistics
  of every rank, pooled since commit f7ca92c; ``fsdp2_memory.json`` was measured before, with rank 0's own),
  broadcasts, ``compress_model``, transplants AdamW's state and rebuilds DDP in place.
* ``fsdp2``: ``fully_shard`` on every block, then the root (``tests/distributed/fsdp2_train.py::shard``);
  ``cut_in_training`` calls ``compress_fully_sharded`` (statistics pooled over the ranks, per-layer gather,
  re-shard in place).

Per rank it records, before the first cut (after that step's optimizer step) and right after the last cut:

* ``state bytes``: this rank's bytes of parameters + optimizer state
  (``compressm_hf.trainer.fsdp2.local_state_bytes``: the local shard of a DTensor, the whole tensor under
  DDP), for the whole model and for the SSM layers alone (the part the cuts shrink). DDP's gradient buckets
  (about one more copy of the parameters) are not in it.
* ``peak RSS``: ``resource.getrusage(RUSAGE_SELF).ru_maxrss`` (never falls, so the "after" value is at
  least the "before" one; the tensor bytes are the exact measure), plus the current RSS (``/proc/self/statm``)
  and the peak at the end of training.
* step time: median process CPU time and wall time of one optimizer step (forward, backward, AdamW, scheduler;
  the cut itself not included) over the steps 3 .. (first statistics step - 1) ("before": 20 steps with the
  defaults) and (last cut + 3) .. ``--steps`` ("after": 232 steps); steps that collect statistics and the 2
  steps after a cut are left out. ``os.getloadavg()`` is recorded around every launch: other jobs on the
  machine slow the wall times (CPU time less so).

Command (about 3-4 minutes on 2 shared CPU cores; writes ``benchmarks/results/fsdp2_memory.json``)::

    .venv/bin/python benchmarks/bench_fsdp2_memory.py

Options: ``--repeats 2`` (DDP then FSDP2, then FSDP2 then DDP), ``--architecture lru|mamba2``, ``--steps``,
``--cuts``, ``--tau``, ``--batch``, ``--out``. ``--tau 0`` is the control: the same runs and cut calls, nothing
reduced (how much the step time and RSS drift between the two windows without a cut). The worker (one rank) is
this file with ``--worker``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ENGINES = ("ddp", "fsdp2")
WARMUP_STEPS = 2  # steps left out of a timing window at the start and after a cut
STATISTICS_STEPS = 2  # the selective layers collect statistics over this many steps up to a cut
MIN_WINDOW = 20
DEFAULT_OUT = "benchmarks/results/fsdp2_memory.json"


# --------------------------------------------------------------------------------------------
# arguments


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an int >= 1, got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    from compressm_hf.cli.architectures import ARCHITECTURES

    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    p.add_argument("--architecture", default="mamba", choices=list(ARCHITECTURES), help="default: mamba")
    p.add_argument("--steps", type=_positive, default=260, help="optimizer steps N per run (default 260)")
    p.add_argument(
        "--cuts", type=_positive, nargs="+", default=[24, 26], help="steps after which to cut (default 24 26)"
    )
    p.add_argument("--tau", type=float, default=0.12, help="RankPolicy tolerance of every cut (default 0.12)")
    p.add_argument("--batch", type=_positive, default=16, help="global batch in blocks, split over the ranks")
    p.add_argument("--block-size", type=_positive, default=128, help="bytes per block (default 128)")
    p.add_argument("--nproc", type=_positive, default=2, help="processes per launch (default 2)")
    p.add_argument("--repeats", type=_positive, default=1, help="launches per engine, order alternating")
    p.add_argument("--seed", type=int, default=42, help="model seed (compressm-train's default 42)")
    p.add_argument("--out", default=DEFAULT_OUT, help=f"JSON written here (default {DEFAULT_OUT})")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--engine", choices=ENGINES, help=argparse.SUPPRESS)
    p.add_argument("--worker-dir", help=argparse.SUPPRESS)
    return p


def windows(args) -> dict[str, list[int]]:
    """The steps timed before the first cut and after the last one.

    Raises:
        ValueError: the cuts are not increasing steps inside ``1 .. --steps``, or a window has fewer than 20
            steps.
    """
    cuts = list(args.cuts)
    if cuts != sorted(set(cuts)) or cuts[-1] >= args.steps:
        raise ValueError(f"--cuts must be increasing steps below --steps {args.steps}, got {cuts}")
    before = list(range(WARMUP_STEPS + 1, cuts[0] - STATISTICS_STEPS + 1))
    after = list(range(cuts[-1] + WARMUP_STEPS + 1, args.steps + 1))
    for name, steps in (("before the first cut", before), ("after the last cut", after)):
        if len(steps) < MIN_WINDOW:
            raise ValueError(
                f"only {len(steps)} timed steps {name} with --steps {args.steps} --cuts {' '.join(map(str, cuts))}; "
                f"need >= {MIN_WINDOW}: the first cut at step >= {MIN_WINDOW + WARMUP_STEPS + STATISTICS_STEPS}, "
                f"the last at step <= --steps - {MIN_WINDOW + WARMUP_STEPS}"
            )
    return {"before": before, "after": after}


# --------------------------------------------------------------------------------------------
# one rank


def _rss_bytes() -> dict[str, int | None]:
    """Peak RSS (``ru_maxrss``, KiB on Linux) and current RSS (``/proc/self/statm``; None elsewhere), in bytes."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
        now = pages * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        now = None
    return {"peak_rss": peak, "rss": now}


def _measure(model, layers, optimizer) -> dict:
    from compressm_hf.trainer.fsdp2 import local_state_bytes

    return {
        "model": local_state_bytes([model], optimizer),
        "ssm_layers": local_state_bytes(layers, optimizer),
        **_rss_bytes(),
    }


def _wrap(model, engine: str):
    """``(the module to call, the DDP wrapper or None)``."""
    if engine == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        ddp = DistributedDataParallel(model, find_unused_parameters=False)
        return ddp, ddp
    sys.path.insert(0, str(ROOT / "tests" / "distributed"))
    from fsdp2_train import shard

    shard(model, "blocks")
    return model, None


def worker(args) -> None:
    """One rank of a launch: train, cut, measure; writes ``{worker_dir}/rank{r}.json``."""
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    from transformers import get_cosine_schedule_with_warmup

    from compressm_hf import RankPolicy, find_reducible_layers
    from compressm_hf.cli.train_args import DataArguments, ModelArguments
    from compressm_hf.cli.train_data import load_splits
    from compressm_hf.cli.train_model import build_model, state_sizes
    from compressm_hf.engine import plan_layers
    from compressm_hf.trainer.distributed_cut import cut_in_training, set_statistics

    timed = windows(args)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    if args.batch % world:
        raise ValueError(f"--batch {args.batch} must be a multiple of the number of processes ({world})")
    per_rank = args.batch // world
    try:
        torch.manual_seed(args.seed)
        model = build_model(ModelArguments(architecture=args.architecture))
        model.train()
        blocks = load_splits(
            DataArguments(block_size=args.block_size, max_train_blocks=args.steps * args.batch)
        )
        ids = torch.tensor(blocks["train"]["input_ids"])
        forward, ddp = _wrap(model, args.engine)
        optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
        scheduler = get_cosine_schedule_with_warmup(optimizer, round(0.1 * args.steps), args.steps)
        layers = find_reducible_layers(model)
        policy = RankPolicy(tau=args.tau)
        sizes_before, cuts, steps, measured = state_sizes(model), [], [], {}
        for step in range(1, args.steps + 1):
            set_statistics(model, any(0 <= c - step < STATISTICS_STEPS for c in args.cuts))
            start = (step - 1) * args.batch % (ids.shape[0] - args.batch + 1)
            x = ids[start : start + args.batch][rank * per_rank : (rank + 1) * per_rank]
            t0, c0 = time.perf_counter(), time.process_time()
            loss = forward(input_ids=x, labels=x).loss
            loss.backward()
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            steps.append({"wall_s": time.perf_counter() - t0, "cpu_s": time.process_time() - c0})
            if step not in args.cuts:
                continue
            if step == args.cuts[0]:
                measured["before"] = _measure(model, layers, optimizer)
            cut = cut_in_training(
                model,
                optimizer,
                lambda found, step=step: plan_layers(found, policy, seed=args.seed, step=step),
                step=step,
                wrapped=ddp,
            )
            cuts.append(
                {
                    "step": step,
                    "sizes_before": list(cut.event.sizes_before),
                    "sizes_after": list(cut.event.sizes_after),
                    "wall_s": cut.wall_time_s,
                    "cpu_s": cut.cpu_time_s,
                }
            )
            if step == args.cuts[-1]:
                measured["after"] = _measure(model, layers, optimizer)
        measured["end"] = _rss_bytes()
        result = {
            "engine": args.engine,
            "rank": rank,
            "world": world,
            "sizes_before": sizes_before,
            "sizes_after": state_sizes(model),
            "cuts": cuts,
            "bytes": measured,
            "timing": {
                phase: {
                    "steps": len(window),
                    "cpu_s": statistics.median(steps[s - 1]["cpu_s"] for s in window),
                    "wall_s": statistics.median(steps[s - 1]["wall_s"] for s in window),
                }
                for phase, window in timed.items()
            },
            "final_loss": float(loss.detach()),
        }
        Path(args.worker_dir, f"rank{rank}.json").write_text(json.dumps(result, indent=1))
    finally:
        dist.destroy_process_group()


# --------------------------------------------------------------------------------------------
# the driver


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker_flags(args) -> list[str]:
    return [
        "--architecture", args.architecture,
        "--steps", str(args.steps),
        "--cuts", *map(str, args.cuts),
        "--tau", str(args.tau),
        "--batch", str(args.batch),
        "--block-size", str(args.block_size),
        "--seed", str(args.seed),
    ]  # fmt: skip


def launch(args, engine: str) -> dict:
    """One torchrun launch of ``--nproc`` workers of ``engine``; returns ``{"ranks": [...], "load": ...}``.

    Raises:
        RuntimeError: torchrun failed (its output's tail is in the message) or a rank wrote no result.
    """
    with tempfile.TemporaryDirectory(prefix=f"fsdp2_bench_{engine}_") as tmp:
        cmd = [
            sys.executable, "-m", "torch.distributed.run",
            "--nproc_per_node", str(args.nproc),
            "--master_addr", "127.0.0.1", "--master_port", str(_free_port()),
            str(Path(__file__).resolve()), "--worker", "--engine", engine, "--worker-dir", tmp,
            *_worker_flags(args),
        ]  # fmt: skip
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
        load_before, t0 = os.getloadavg(), time.perf_counter()
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
        wall, load_after = time.perf_counter() - t0, os.getloadavg()
        if proc.returncode != 0:
            raise RuntimeError(
                f"torchrun ({engine}) exited {proc.returncode}:\n{(proc.stdout + proc.stderr)[-4000:]}"
            )
        ranks = []
        for r in range(args.nproc):
            path = Path(tmp, f"rank{r}.json")
            if not path.exists():
                raise RuntimeError(
                    f"torchrun ({engine}) wrote no result for rank {r}:\n{proc.stderr[-4000:]}"
                )
            ranks.append(json.loads(path.read_text()))
    return {
        "engine": engine,
        "ranks": ranks,
        "launch_wall_s": wall,
        "loadavg_before": list(load_before),
        "loadavg_after": list(load_after),
    }


def _kib(n: int) -> str:
    return f"{n / 1024:,.0f}"


def _mib(n: int | None) -> str:
    return "-" if n is None else f"{n / 2**20:,.0f}"


def _state(m: dict) -> str:
    """``params + Adam KiB (of which the SSM layers)`` of one measurement."""
    whole, ssm = m["model"], m["ssm_layers"]
    return f"{_kib(whole['params'] + whole['optimizer'])} ({_kib(ssm['params'] + ssm['optimizer'])})"


def _ms(results: list[dict], key: str, phase: str) -> float:
    """Median over ``results`` (one rank, every launch) of the per-launch median step time, in ms."""
    return 1e3 * statistics.median(x["timing"][phase][key] for x in results)


def table(launches: list[dict]) -> str:
    """Markdown: one row per engine and rank (state and RSS from the first launch of the engine; step times:
    median over its launches of each launch's median; load: the 1-minute load average before the launch)."""
    rows = [
        "| engine | rank | state sizes | params + Adam, KiB (SSM layers) | peak RSS, MiB | CPU ms/step "
        "| wall ms/step | load 1 min |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for engine in ENGINES:
        mine = [run for run in launches if run["engine"] == engine]
        if not mine:
            continue
        load = statistics.median(run["loadavg_before"][0] for run in mine)
        for r in range(len(mine[0]["ranks"])):
            res = [run["ranks"][r] for run in mine]
            first = res[0]
            b, a = first["bytes"]["before"], first["bytes"]["after"]
            rows.append(
                f"| {engine} | {r} | {sum(first['sizes_before'])} → {sum(first['sizes_after'])} "
                f"| {_state(b)} → {_state(a)} "
                f"| {_mib(b['peak_rss'])} → {_mib(first['bytes']['end']['peak_rss'])} "
                f"| {_ms(res, 'cpu_s', 'before'):.0f} → {_ms(res, 'cpu_s', 'after'):.0f} "
                f"| {_ms(res, 'wall_s', 'before'):.0f} → {_ms(res, 'wall_s', 'after'):.0f} | {load:.1f} |"
            )
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    if args.worker:
        if args.engine is None or args.worker_dir is None:
            raise SystemExit("--worker needs --engine and --worker-dir (the driver passes them)")
        worker(args)
        return
    if not 0.0 <= args.tau < 1.0:
        raise SystemExit(f"--tau must be in [0, 1), got {args.tau}")
    try:
        timed = windows(args)
    except ValueError as exc:
        raise SystemExit(str(exc)) from exc
    import torch

    launches = []
    for repeat in range(args.repeats):
        for engine in ENGINES if repeat % 2 == 0 else ENGINES[::-1]:
            print(f"[{repeat + 1}/{args.repeats}] {engine}: torchrun x{args.nproc} ...", flush=True)
            run = launch(args, engine)
            print(
                f"    {run['launch_wall_s']:.0f} s, load {run['loadavg_before'][0]:.2f} -> {run['loadavg_after'][0]:.2f}",
                flush=True,
            )
            launches.append(run)
    text = table(launches)
    print()
    print(text)
    print(
        f"\n{args.architecture} (compressm-train defaults), {args.nproc} gloo processes x 1 thread, global batch "
        f"{args.batch} x {args.block_size} bytes, {args.steps} steps, cuts after steps {args.cuts} (tau {args.tau}); "
        f"timed: {len(timed['before'])} steps before, {len(timed['after'])} after; 'state sizes': summed over "
        "the layers; bytes: before the first cut -> after the last; peak RSS: before the first cut -> end"
    )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    record = {
        "benchmark": "bench_fsdp2_memory",
        "command": " ".join(
            ["python", "benchmarks/bench_fsdp2_memory.py"]
            + [Path(a).name if os.path.isabs(a) else a for a in (sys.argv[1:] if argv is None else argv)]
        ),
        "torch": torch.__version__,
        "model": f"{args.architecture}: compressm-train's ModelArguments defaults",
        "settings": {
            k: v for k, v in vars(args).items() if k not in ("worker", "engine", "worker_dir", "out")
        },
        "timed_steps": {k: [v[0], v[-1]] for k, v in timed.items()},
        "launches": launches,
        "table_markdown": text,
    }
    out.write_text(json.dumps(record, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
