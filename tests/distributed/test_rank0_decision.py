"""``decided_on_rank0``: rank 0's plan reaches every rank, and when rank 0's planner raises, every other rank gets
an error at once (not a wait in the broadcast until the process group times out)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.distributed

HERE = Path(__file__).resolve().parent

WORKER = r"""
import json, os, sys, time, datetime
import torch.distributed as dist
import torch.multiprocessing as mp
sys.path[:0] = [{root!r}]

def boom():
    raise ValueError("no statistics in layer 1")

def worker(rank, port, out):
    from compressm_hf.trainer.surgery import decided_on_rank0
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2, timeout=datetime.timedelta(seconds=120))
    got = {{"plan": decided_on_rank0(lambda: {{"rank": dist.get_rank()}}, "the plan of step 4")}}
    t0 = time.monotonic()
    try:
        decided_on_rank0(boom, "the plan of step 8")
    except Exception as exc:
        got["error"] = [type(exc).__name__, str(exc)]
    got["seconds"] = time.monotonic() - t0
    with open(f"{{out}}/rank{{rank}}.json", "w") as f:
        json.dump(got, f)
    dist.destroy_process_group()

if __name__ == "__main__":
    mp.spawn(worker, args=({port}, {tmp!r}), nprocs=2)
"""


def test_a_planner_error_on_rank0_reaches_every_rank(tmp_path):
    from test_ddp_training import _env, _free_port

    script = tmp_path / "worker.py"
    script.write_text(WORKER.format(root=str(HERE.parents[1]), port=_free_port(), tmp=str(tmp_path)))
    proc = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, env=_env(), timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert r0["plan"] == r1["plan"] == {"rank": 0}
    assert r0["error"] == ["ValueError", "no statistics in layer 1"]
    assert r1["error"][0] == "RuntimeError" and "the plan of step 8: rank 0 failed" in r1["error"][1]
    assert "ValueError: no statistics in layer 1" in r1["error"][1]
    assert r1["seconds"] < 60  # not the process group's 120 s timeout
