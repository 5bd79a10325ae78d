"""Resume of an FSDP2 (``fully_shard``) run from a sharded checkpoint written right after a cut, after a SIGKILL.

Two torchrun launches (2 CPU processes, gloo; ``tests/distributed/fsdp2_resume_train.py``):

1. ``first``: run C trains each model uninterrupted (cuts at ``steps``), then run A trains it to ``save_step``
   (a cut step), saves model + optimizer (sharded with ``torch.distributed.checkpoint``, or full state dicts
   on rank 0) and the sizes (the report of ``build_report``, or ``config.json``); after the last save every
   rank SIGKILLs itself.
2. ``resume``: run B builds each model at its ORIGINAL size, ``resize_to_checkpoint``, ``fully_shard``,
   builds the optimizer, loads the checkpoint and trains to ``max_steps`` (with the cuts still scheduled).

The runs are deterministic (same seed, batches, reduction order; a cut plans on the same full tensors), so B
must end bit for bit where C ends: parameters, Adam moments, sizes, cuts, on both ranks.
"""

from __future__ import annotations

import json
import shutil
import subprocess

import pytest
import torch
from test_ddp_training import BIN, HERE, ROOT, _env, _free_port

pytestmark = [pytest.mark.distributed, pytest.mark.crash]

SCRIPT = HERE / "fsdp2_resume_train.py"
RUNS = {
    # saved after the first of two cuts (the second one runs after the resume); sizes from the report
    "lru": dict(model="lru", state_size=12, tau=0.1, steps=[3, 6], save_step=3, sizes_file="report"),
    # saved after the last cut (no cut after the resume) as full state dicts on rank 0 (accelerate's
    # FULL_STATE_DICT; loaded with broadcast_from_rank0); sizes from the report
    "lru_last": dict(
        model="lru", state_size=12, tau=0.1, steps=[3, 6], save_step=6, sizes_file="report", format="full"
    ),
    # modal cuts on pooled statistics, saved after the first; sizes from config.json (no report)
    "mamba": dict(model="mamba", state_size=8, tau=0.3, steps=[4, 8], save_step=4, sizes_file="config"),
}


def _torchrun(phase: str, spec) -> subprocess.CompletedProcess:
    exe = shutil.which("torchrun", path=str(BIN)) or "torchrun"
    cmd = [exe, "--nproc_per_node", "2", "--master_addr", "127.0.0.1", "--master_port", str(_free_port())]
    return subprocess.run(
        [*cmd, str(SCRIPT), phase, str(spec)],
        env=_env(),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=240,
    )


def _load(tmp, name: str, run: str) -> list[dict]:
    return [torch.load(tmp / name / f"{run}_rank{r}.pt", weights_only=False) for r in (0, 1)]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fsdp2_resume")
    spec = tmp / "runs.json"
    spec.write_text(json.dumps([{"name": name, "out": str(tmp / name), **cfg} for name, cfg in RUNS.items()]))
    first = _torchrun("first", spec)
    if first.returncode == 0 or not all((tmp / f"killing_rank{r}").is_file() for r in (0, 1)):
        pytest.fail(
            f"phase 'first' should end with every rank SIGKILLed after its saves (rc {first.returncode}):\n"
            f"{first.stdout[-3000:]}\n{first.stderr[-5000:]}"
        )
    resume = _torchrun("resume", spec)
    if resume.returncode != 0:
        pytest.fail(
            f"phase 'resume' failed ({resume.returncode}):\n{resume.stdout[-3000:]}\n{resume.stderr[-6000:]}"
        )
    results = {name: {run: _load(tmp, name, run) for run in "ABC"} for name in RUNS}
    return tmp, first, results


def _assert_equal(got: dict, want: dict, what: str) -> None:
    assert got["params"].keys() == want["params"].keys()
    for key, value in want["params"].items():
        assert torch.equal(got["params"][key], value), f"{what}: {key} differs"
    assert got["moments"].keys() == want["moments"].keys()
    for key, moments in want["moments"].items():
        assert moments.keys() == got["moments"][key].keys()
        for slot, value in moments.items():
            assert torch.equal(got["moments"][key][slot], value), f"{what}: {key}.{slot} differs"


def test_the_first_phase_was_killed_after_its_saves(runs):
    tmp, first, _ = runs
    assert "SIGKILL" in first.stdout + first.stderr
    for name, cfg in RUNS.items():
        folder = tmp / name / f"checkpoint-{cfg['save_step']}"
        saved = folder / "state" / ".metadata" if cfg.get("format") != "full" else folder / "full_state.pt"
        assert saved.is_file()
        assert (folder / "compression_report.json").is_file() == (cfg["sizes_file"] == "report")
        assert all((tmp / name / f"A_rank{r}.pt").is_file() for r in (0, 1))


@pytest.mark.parametrize("name", sorted(RUNS))
def test_resized_before_sharding_to_the_saved_sizes(runs, name):
    from compressm_hf.trainer.resume import saved_state_sizes

    tmp, _, results = runs
    cfg = RUNS[name]
    a, b, c = (results[name][run][0] for run in "ABC")
    at_save = next(cut["sizes_after"] for cut in c["cuts"] if cut["step"] == cfg["save_step"])
    assert a["sizes"] == at_save and sum(at_save) < 2 * cfg["state_size"]
    assert b["built_sizes"] == [cfg["state_size"]] * 2
    assert b["resized_sizes"] == b["saved_sizes"] == at_save
    assert saved_state_sizes(tmp / name / f"checkpoint-{cfg['save_step']}") == at_save
    # once fully_shard'ed, the model is refused
    assert "already fully_shard-ed" in b["refused_after_shard"]
    # the control: without resize_to_checkpoint, DCP cannot load into the original shapes
    if cfg.get("format") != "full":
        assert "CheckpointException" in b["without_resize"] and "Size mismatch" in b["without_resize"]


@pytest.mark.parametrize("name", sorted(RUNS))
def test_resume_loads_exactly_what_was_saved(runs, name):
    _, _, results = runs
    for a, b in zip(results[name]["A"], results[name]["B"]):
        _assert_equal(b["loaded"], a, f"{name} rank {b['rank']} after the load")


@pytest.mark.parametrize("name", sorted(RUNS))
def test_resumed_run_ends_bit_for_bit_where_the_uninterrupted_one_ends(runs, name):
    _, _, results = runs
    cfg = RUNS[name]
    (b0, b1), (c0, c1) = results[name]["B"], results[name]["C"]
    assert (b0["rank"], b1["rank"], b0["world"]) == (0, 1, 2)
    assert b0["sizes"] == b1["sizes"] == c0["sizes"] == c1["sizes"]
    assert b0["cuts"] == b1["cuts"] == [cut for cut in c0["cuts"] if cut["step"] > cfg["save_step"]]
    _assert_equal(b0, c0, f"{name}: B vs C")
    _assert_equal(b1, b0, f"{name}: B rank 1 vs rank 0")
    _assert_equal(c1, c0, f"{name}: C rank 1 vs rank 0")
