"""CompreSSMCallback under DDP (2 CPU processes, gloo), launched by torchrun and accelerate launch.

Two launches cover the matrix (each 2-process start costs ~10-20 s on a small machine):

* ``torchrun --nproc_per_node 2``: toy ga=1 find_unused=True, toy ga=2 find_unused=False, toy
  pragmatic with a forced rollback, LRU;
* ``accelerate launch --multi_gpu --num_processes 2``: toy ga=1 (the Trainer's default find_unused,
  same configuration as the first torchrun run), Mamba.

Every rank saves its final state dict; the tests compare them bit for bit.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.distributed

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
SCRIPT = HERE / "ddp_train.py"
BIN = Path(sys.executable).parent

TORCHRUN_RUNS = {
    "toy_ga1_unused": dict(ga=1, unused=True, snapshot_steps=[3]),
    "toy_ga2_static": dict(ga=2, unused=False, max_steps=8),
    "toy_pragmatic": dict(
        mode="pragmatic",
        tau=None,
        steps=[4, 8],
        eval_steps=2,
        # "greater is better" on eval_loss with tolerance 0: the loss falling after the cut counts as a
        # drop, so the cut at step 4 is rolled back at the evaluation of step 6
        greater_is_better=True,
        pragmatic_tolerance=0.0,
        snapshot_steps=[4],
        after_steps=[6],
        max_steps=10,
    ),
    "lru": dict(model="lru", max_steps=10),
}
ACCELERATE_RUNS = {
    "toy_ga1_accelerate": dict(ga=1, snapshot_steps=[3]),
    "mamba": dict(model="mamba", state_size=8, tau=0.3, steps=[4, 8], max_steps=10),
}


def _env():
    env = dict(os.environ)
    env.update(
        OMP_NUM_THREADS="1",
        MKL_NUM_THREADS="1",
        TOKENIZERS_PARALLELISM="false",
        PYTHONPATH=os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]),
        MASTER_ADDR="127.0.0.1",
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_NO_ADVISORY_WARNINGS="1",
    )
    env.pop("CUDA_VISIBLE_DEVICES", None)
    return env


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(launcher: str, runs: dict, tmp: Path) -> dict:
    configs = [{"name": name, "out": str(tmp / name), **cfg} for name, cfg in runs.items()]
    spec = tmp / "runs.json"
    spec.write_text(json.dumps(configs))
    port = str(_free_port())
    if launcher == "torchrun":
        exe = shutil.which("torchrun", path=str(BIN)) or "torchrun"
        cmd = [exe, "--nproc_per_node", "2", "--master_addr", "127.0.0.1", "--master_port", port]
    else:
        exe = shutil.which("accelerate", path=str(BIN)) or "accelerate"
        cmd = [exe, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1"]
        cmd += ["--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", port]
    proc = subprocess.run(
        [*cmd, str(SCRIPT), str(spec)], env=_env(), cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    if proc.returncode != 0:
        pytest.fail(f"{launcher} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}")
    results = {}
    for name in runs:
        results[name] = [torch.load(tmp / name / f"result_rank{r}.pt", weights_only=False) for r in (0, 1)]
    return results


@pytest.fixture(scope="module")
def torchrun_results(tmp_path_factory):
    return _launch("torchrun", TORCHRUN_RUNS, tmp_path_factory.mktemp("torchrun"))


@pytest.fixture(scope="module")
def accelerate_results(tmp_path_factory):
    return _launch("accelerate", ACCELERATE_RUNS, tmp_path_factory.mktemp("accelerate"))


def _load_driver():
    spec = importlib.util.spec_from_file_location("compressm_ddp_train", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _assert_identical_ranks(results):
    r0, r1 = results
    assert r0["world"] == r1["world"] == 2 and (r0["rank"], r1["rank"]) == (0, 1)
    assert r0["wrapped"]["type"] == "DistributedDataParallel"
    assert r0["sizes"] == r1["sizes"]
    untimed = _load_driver().untimed
    assert untimed(r0["history"]) == untimed(r1["history"])
    assert r0["state_dict"].keys() == r1["state_dict"].keys()
    for k, v in r0["state_dict"].items():
        assert torch.equal(v, r1["state_dict"][k]), f"{k} differs across ranks"
    assert r0["optimizer"].keys() == r1["optimizer"].keys()
    for name, st in r0["optimizer"].items():
        for key, value in st.items():
            other = r1["optimizer"][name][key]
            assert torch.equal(value, other) if torch.is_tensor(value) else value == other, (name, key)


def _cuts(result):
    return [
        (e["step"], e["sizes_before"], e["sizes_after"])
        for e in result["history"]
        if e["kind"] == "reduction"
    ]


@pytest.mark.parametrize("name", sorted(TORCHRUN_RUNS))
def test_torchrun_ranks_identical(torchrun_results, name):
    results = torchrun_results[name]
    _assert_identical_ranks(results)
    cfg = TORCHRUN_RUNS[name]
    if cfg.get("unused") is not None:
        assert results[0]["wrapped"]["find_unused"] is cfg["unused"]
    # the model really shrank and the scheduled steps were handled
    assert any(e["layers_reduced"] for e in results[0]["history"] if e["kind"] == "reduction")
    assert results[0]["global_step"] == cfg.get("max_steps", 12)


@pytest.mark.parametrize("name", sorted(ACCELERATE_RUNS))
def test_accelerate_launch_ranks_identical(accelerate_results, name):
    results = accelerate_results[name]
    _assert_identical_ranks(results)
    reductions = [e for e in results[0]["history"] if e["kind"] == "reduction"]
    assert reductions and reductions[0]["layers_reduced"] > 0
    assert results[0]["sizes"] == reductions[-1]["sizes_after"]


def test_same_cut_on_every_rank_from_rank0_plan(torchrun_results):
    # rank 0 planned; the other rank applied the same per-layer rule/energy (broadcast, not re-planned)
    r0, r1 = torchrun_results["toy_ga1_unused"]
    for e0, e1 in zip(r0["history"], r1["history"]):
        assert [layer.get("hsv") for layer in e0["layers"]] == [layer.get("hsv") for layer in e1["layers"]]
    assert [step for step, _, _ in _cuts(r0)] == [3, 6]


def test_pragmatic_rollback_restores_precut_state_on_every_rank(torchrun_results):
    for result in torchrun_results["toy_pragmatic"]:
        kinds = [(e["kind"], e["step"]) for e in result["history"]]
        assert kinds == [("reduction", 4), ("rollback", 6)], kinds
        assert result["stopped"]
        before, after = result["snapshots"][4], result["after"][6]
        assert after["sizes"] == before["sizes"] == [12, 12]
        for k, v in before["model"].items():
            assert torch.equal(after["model"][k], v), k
        assert before["optimizer"].keys() == after["optimizer"].keys()
        for name, st in before["optimizer"].items():
            for key, value in st.items():
                got = after["optimizer"][name][key]
                assert torch.equal(got, value) if torch.is_tensor(value) else got == value, (name, key)
        assert result["sizes"] == [12, 12]


def test_torchrun_and_accelerate_launch_agree(torchrun_results, accelerate_results):
    # the same configuration (2 ranks, batch 4, ga 1, find_unused default=True) under both launchers
    a, b = torchrun_results["toy_ga1_unused"][0], accelerate_results["toy_ga1_accelerate"][0]
    assert _cuts(a) == _cuts(b)
    for k, v in a["state_dict"].items():
        assert torch.equal(v, b["state_dict"][k]), k


def test_world_size_1_vs_2_same_cuts(torchrun_results, tmp_path):
    """2 ranks x batch 4 x ga 1 vs 1 process x batch 4 x ga 2: the same 8 samples per optimizer step
    (accelerate shards whole batches round-robin), the same mean-of-means loss; only the floating-point
    summation order differs. Same cuts (steps, sizes, per-layer rule), final weights close."""
    driver = _load_driver()
    single = driver.run({"out": str(tmp_path / "w1"), "batch": 4, "ga": 2, "snapshot_steps": [3]})
    dist = torchrun_results["toy_ga1_unused"][0]
    assert _cuts(single) == _cuts(dist)
    # identical weights -> identical plan: re-plan rank 0's pre-cut weights in this process
    for k, v in dist["snapshots"][3]["model"].items():
        torch.testing.assert_close(single["snapshots"][3]["model"][k], v, rtol=1e-4, atol=1e-5)
    for k, v in dist["state_dict"].items():
        torch.testing.assert_close(single["state_dict"][k], v, rtol=1e-3, atol=1e-4, msg=k)
