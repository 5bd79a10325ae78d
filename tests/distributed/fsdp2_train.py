"""Training driver for the FSDP2 tests: a plain loop (no Trainer), tiny models, cuts at scheduled steps.

Run as a script under torchrun (every process applies ``fully_shard`` to each block, then to the root)::

    torchrun --nproc_per_node 2 tests/distributed/fsdp2_train.py RUNS.json

or import it and call :func:`run` in one process: the single-process reference (same seed, same data,
``compress_model`` + ``transplant_optimizer_state``). ``RUNS.json`` holds a list of run configurations (see
``DEFAULTS``), trained one after the other in the same process group. Each optimizer step takes the same
global batch of ``batch`` sequences (rank ``r`` of ``w`` takes rows ``r*batch/w ... (r+1)*batch/w``), so both
runs see the same tokens and FSDP's gradient average equals the single process's mean loss.

Under torchrun every rank writes ``{out}/result_rank{rank}.pt``: the full (unsharded) parameters and optimizer
moments after training, sizes, cut records, bytes of the SSM layers' local parameters + optimizer state before
and after each cut, step times, probe logits; rank 0 also saves the model (full state dict through
``save_pretrained_fully_sharded``) in ``{out}/model``.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
for path in (ROOT, Path(__file__).resolve().parent):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

from ddp_train import build_model, untimed  # noqa: E402

from compressm_hf import RankPolicy, compress_model, find_reducible_layers  # noqa: E402
from compressm_hf.engine import plan_layers  # noqa: E402
from compressm_hf.trainer.fsdp2 import (  # noqa: E402
    compress_fully_sharded,
    local_state_bytes,
    save_pretrained_fully_sharded,
)
from compressm_hf.trainer.surgery import transplant_optimizer_state  # noqa: E402
from tests.trainer.toy_ssm import CountingDataset  # noqa: E402

DEFAULTS = {
    "model": "lru",  # lru | mamba | mamba2 (tests/distributed/ddp_train.py's build_model)
    "state_size": 12,
    "n_groups": 1,
    "tau": 0.1,
    "steps": [3, 6],
    "max_steps": 10,
    "batch": 8,  # global batch per optimizer step
    "statistics_steps": 2,  # selective layers collect statistics over this many steps up to a cut
    "optimizer_state": "slice",
    "wrap": "blocks",
    "planner": "callable",  # callable: a function of the layers run on rank 0; policy: the RankPolicy itself  # blocks: fully_shard every block, then the root; root: the root only (one FSDP unit)
    "seed": 0,
}


def _dist():
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def rank_world() -> tuple[int, int]:
    return (torch.distributed.get_rank(), torch.distributed.get_world_size()) if _dist() else (0, 1)


def _blocks(model) -> torch.nn.ModuleList:
    inner = getattr(model, "backbone", None) or model.model
    return inner.layers


def shard(model, wrap: str) -> None:
    """``fully_shard`` every block (``wrap="blocks"``), then the root (1-D CPU mesh over all ranks)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    if wrap not in ("blocks", "root"):
        raise ValueError(f"wrap must be 'blocks' or 'root', got {wrap!r}")
    mesh = init_device_mesh("cpu", (rank_world()[1],))
    for block in _blocks(model) if wrap == "blocks" else ():
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)


def _set_statistics(layers, enabled: bool, reset: bool = False) -> None:
    for layer in layers:
        if hasattr(layer, "collect_statistics"):
            layer.collect_statistics = enabled
            if reset:
                layer.reset_statistics()


def _full(t: torch.Tensor) -> torch.Tensor:
    return (t.full_tensor() if hasattr(t, "full_tensor") else t).detach().clone()


def full_parameters(model) -> dict[str, torch.Tensor]:
    """Every parameter, unsharded (a collective under FSDP: every rank calls it)."""
    return {name: _full(p) for name, p in model.named_parameters()}


def full_moments(model, optimizer) -> dict[str, dict[str, torch.Tensor]]:
    names = {id(p): n for n, p in model.named_parameters()}
    return {
        names[id(p)]: {k: _full(v) for k, v in st.items() if torch.is_tensor(v)}
        for p, st in optimizer.state.items()
    }


def _cut(model, optimizer, cfg, step: int, distributed: bool):
    policy = RankPolicy(tau=cfg["tau"])
    if distributed:
        planner = policy
        if cfg["planner"] == "callable":
            planner = lambda layers: plan_layers(layers, policy, seed=cfg["seed"], step=step)
        return compress_fully_sharded(
            model, optimizer, planner, optimizer_state=cfg["optimizer_state"], seed=cfg["seed"], step=step
        )
    event = compress_model(model, policy, seed=cfg["seed"], step=step)
    transplant_optimizer_state(optimizer, event.swaps, cfg["optimizer_state"])
    return event


def run(cfg: dict) -> dict:
    cfg = {**DEFAULTS, **cfg}
    rank, world = rank_world()
    distributed = world > 1
    model = build_model(cfg)
    if distributed:
        shard(model, cfg["wrap"])
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.01)
    data = CountingDataset(size=64, seed=0).ids
    layers = find_reducible_layers(model)
    per_rank = cfg["batch"] // world
    cuts, times = [], []
    for step in range(1, cfg["max_steps"] + 1):
        collect = any(0 <= s - step < cfg["statistics_steps"] for s in cfg["steps"])
        _set_statistics(layers, collect)
        start = (step - 1) * cfg["batch"] % data.shape[0]
        ids = data[start : start + cfg["batch"]][rank * per_rank : (rank + 1) * per_rank]
        t0 = time.perf_counter()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
        if step in cfg["steps"]:
            before = local_state_bytes(layers, optimizer)
            event = _cut(model, optimizer, cfg, step, distributed)
            after = local_state_bytes(layers, optimizer)
            _set_statistics(layers, False, reset=True)
            in_optimizer = {id(p) for g in optimizer.param_groups for p in g["params"]}
            cuts.append(
                {
                    "step": step,
                    "sizes_before": event.sizes_before,
                    "sizes_after": event.sizes_after,
                    "layers": untimed([{k: v for k, v in rec.items() if k != "hsv"} for rec in event.layers]),
                    "hsv": [rec.get("hsv") for rec in event.layers],
                    "bytes_before": before,
                    "bytes_after": after,
                    "optimizer_holds_model_params": in_optimizer == {id(p) for p in model.parameters()},
                    "optimizer_counts": getattr(event, "optimizer", None),
                    "params_after": full_parameters(model),
                    "cut_s": event.wall_time_s,
                }
            )
    params, moments = full_parameters(model), full_moments(model, optimizer)  # before a forward unshards
    model.eval()
    probe = data[:4]
    with torch.no_grad():
        logits = model(input_ids=probe).logits.detach().clone()
    result = {
        "name": cfg.get("name"),
        "rank": rank,
        "world": world,
        "sizes": list(model.config.state_sizes),
        "params": params,
        "moments": moments,
        "cuts": cuts,
        "step_times": times,
        "probe": probe,
        "logits": logits,
    }
    if distributed:
        save_pretrained_fully_sharded(model, os.path.join(cfg["out"], "model"))
        torch.save(result, os.path.join(cfg["out"], f"result_rank{rank}.pt"))
    return result


def main(argv: list[str], run_one=None) -> None:
    """Run every configuration of ``argv[0]`` (a JSON file or string) in one gloo process group with ``run_one``
    (default :func:`run`, which saves its own result)."""
    spec = argv[0]
    runs = json.loads(Path(spec).read_text() if os.path.isfile(spec) else spec)
    torch.distributed.init_process_group("gloo")
    try:
        for cfg in runs:
            Path(cfg["out"]).mkdir(parents=True, exist_ok=True)
            (run_one or run)(cfg)
    finally:
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    torch.set_num_threads(1)
    main(sys.argv[1:])
