"""Under DDP rank 0 plans a cut from the surrogate statistics of every rank's tokens (``pool_statistics_``): two gloo
processes see different batches, and after pooling both hold the statistics one process gets from all of them."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.distributed

HERE = Path(__file__).resolve().parent

WORKER = r"""
import json, os, sys
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
sys.path[:0] = [{root!r}, {here!r}]

def stats_after(model, batches):
    from compressm_hf import find_reducible_layers
    from compressm_hf.trainer.statistics import set_statistics
    set_statistics(model, True)
    with torch.no_grad():
        for ids in batches:
            model(ids)
    set_statistics(model, False)
    return find_reducible_layers(model)

def batches(rank):
    g = torch.Generator().manual_seed(100 + rank)
    return [torch.randint(0, 12, (2, 6), generator=g) for _ in range(2)]

def worker(rank, port, out):
    from ddp_train import build_model
    from compressm_hf.trainer.statistics import pool_statistics_
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    layers = stats_after(build_model({{"model": "mamba", "state_size": 8, "seed": 0}}), batches(rank))
    local = {{k: float(v.sum()) if torch.is_tensor(v) else float(v) for k, v in layers[0]._stats.items()}}
    pool_statistics_(layers)
    pooled = {{k: float(v.sum()) if torch.is_tensor(v) else float(v) for k, v in layers[0]._stats.items()}}
    system = layers[0].lti_system()
    torch.save({{"local": local, "pooled": pooled, "A": system.A, "B": system.B}}, f"{{out}}/rank{{rank}}.pt")
    dist.destroy_process_group()

if __name__ == "__main__":
    from ddp_train import build_model
    out = {tmp!r}
    mp.spawn(worker, args=({port}, out), nprocs=2)
    layers = stats_after(build_model({{"model": "mamba", "state_size": 8, "seed": 0}}), batches(0) + batches(1))
    single = {{k: float(v.sum()) if torch.is_tensor(v) else float(v) for k, v in layers[0]._stats.items()}}
    system = layers[0].lti_system()
    torch.save({{"single": single, "A": system.A, "B": system.B}}, f"{{out}}/single.pt")
"""


def test_pooled_statistics_are_those_of_all_ranks_tokens(tmp_path):
    import torch
    from test_ddp_training import _env, _free_port

    script = tmp_path / "worker.py"
    script.write_text(
        WORKER.format(root=str(HERE.parents[1]), here=str(HERE), port=_free_port(), tmp=str(tmp_path))
    )
    proc = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, env=_env(), timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1))
    single = torch.load(tmp_path / "single.pt", weights_only=False)
    assert r0["local"] != r1["local"]  # different batches
    assert r0["pooled"] == r1["pooled"]
    for key, value in single["single"].items():
        assert r0["pooled"][key] == pytest.approx(value, rel=1e-9), key
    assert r0["local"]["tokens"] + r1["local"]["tokens"] == single["single"]["tokens"]
    torch.testing.assert_close(r0["B"], single["B"], rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(r0["A"], r1["A"], rtol=0, atol=0)
    print(json.dumps({"tokens": single["single"]["tokens"]}))
