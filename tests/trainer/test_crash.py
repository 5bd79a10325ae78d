"""Crash safety: SIGKILL a training process at different moments, resume with
``trainer.train(resume_from_checkpoint=True)`` from a model built at its ORIGINAL size.

Schedule: cuts at optimizer steps 4 and 7, a checkpoint every 3 steps, 10 steps. The training
subprocess (``tests/distributed/ddp_train.py``) blocks at the chosen moment after writing
``CRASH_READY``; the test kills it with SIGKILL, then resumes in-process and compares with an
uninterrupted run (same seed and data order: transformers restores the RNG and skips the consumed
batches, so the resumed run replays the same batches).
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from transformers.trainer_utils import get_last_checkpoint

from compressm_hf.trainer.callback import (
    is_complete_checkpoint,
    last_complete_checkpoint,
)

pytestmark = pytest.mark.crash

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "tests" / "distributed" / "ddp_train.py"
CFG = dict(steps=[4, 7], save_steps=3, max_steps=10, batch=8)


def _driver():
    spec = importlib.util.spec_from_file_location("compressm_ddp_train", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("reference") / "run"
    return _driver().run({**CFG, "out": str(out)})


SCENARIOS = {  # name: (crash point, step)
    "before_cut": ("before_cut", 7),  # step 7 done, its cut not made; last checkpoint 6 (after the cut at 4)
    "after_cut": ("after_cut", 4),  # the cut at 4 made in memory, never saved; last checkpoint 3
    "mid_save": ("mid_save", 6),  # checkpoint-6: weights written, no optimizer, no trainer_state.json
    "on_save": ("on_save", 6),  # transformers' files complete, compression_report.json not yet
}


def _start(out: Path, at: str, step: int) -> subprocess.Popen:
    cfg = {**CFG, "out": str(out), "crash": {"at": at, "step": step}}
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1")
    return subprocess.Popen(
        [sys.executable, str(SCRIPT), json.dumps([cfg])],
        env=env,
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )


@pytest.fixture(scope="module")
def crashed(tmp_path_factory):
    """All scenarios run concurrently (the interpreter start dominates); each is SIGKILLed at its point."""
    root = tmp_path_factory.mktemp("crashed")
    procs = {name: (root / name, _start(root / name, at, step)) for name, (at, step) in SCENARIOS.items()}
    errors = {}
    deadline = time.monotonic() + 300
    try:
        pending = dict(procs)
        while pending:
            for name, (out, proc) in list(pending.items()):
                if (out / "CRASH_READY").exists():
                    os.kill(proc.pid, signal.SIGKILL)
                    proc.wait(timeout=30)
                    del pending[name]
                elif proc.poll() is not None:
                    errors[name] = (
                        f"ended before the crash point ({proc.returncode}):\n{proc.stderr.read()[-4000:]}"
                    )
                    del pending[name]
            if time.monotonic() > deadline:
                errors.update({name: "did not reach the crash point in time" for name in pending})
                break
            time.sleep(0.05)
    finally:
        for _, proc in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            proc.stderr.close()
    return root, errors


def _crash(crashed, name: str) -> Path:
    root, errors = crashed
    if name in errors:
        pytest.fail(errors[name])
    out = root / name
    ready = out / "CRASH_READY"
    assert ready.read_text() == SCENARIOS[name][0]
    ready.unlink()
    return out


def _check_resume(out: Path, expected_step: int, reference: dict) -> dict:
    ckpt = out / f"checkpoint-{expected_step}"
    saved_state = json.loads((ckpt / "trainer_state.json").read_text())
    saved_sizes = json.loads((ckpt / "config.json").read_text())["state_sizes"]
    saved_opt = torch.load(ckpt / "optimizer.pt", weights_only=True)

    resumed = _driver().run({**CFG, "out": str(out), "resume": True})

    # resumed from that checkpoint: its step, sizes, compression history and optimizer state
    begin = resumed["begin"]
    assert begin["global_step"] == expected_step
    assert begin["sizes"] == saved_sizes
    cb_state = saved_state["stateful_callbacks"]["CompreSSMCallback"]
    assert resumed["begin_history"] == cb_state["attributes"]["history"]
    opt_sd = begin["optimizer_state_dict"]
    assert opt_sd["state"].keys() == saved_opt["state"].keys()
    for idx, st in saved_opt["state"].items():
        for key, value in st.items():
            torch.testing.assert_close(opt_sd["state"][idx][key], value, rtol=0, atol=0)

    # ... and ends where the uninterrupted run ended
    assert resumed["sizes"] == reference["sizes"]
    untimed = _driver().untimed
    assert untimed(resumed["history"]) == untimed(reference["history"])
    for k, v in reference["state_dict"].items():
        torch.testing.assert_close(resumed["state_dict"][k], v, rtol=1e-5, atol=1e-6, msg=k)
    report = json.loads((out / "compression_report.json").read_text())
    assert [e["step"] for e in report["events"]] == [4, 7]
    assert report["final_sizes"] == reference["sizes"]
    return resumed


def test_kill_before_a_cut(crashed, reference):
    # step 7 done, its cut not yet made; last checkpoint: 6 (after the cut at 4)
    out = _crash(crashed, "before_cut")
    assert last_complete_checkpoint(out) == str(out / "checkpoint-6")
    _check_resume(out, 6, reference)


def test_kill_right_after_a_cut(crashed, reference):
    # the cut at 4 made in memory, never saved; last checkpoint: 3 (original sizes)
    out = _crash(crashed, "after_cut")
    assert json.loads((out / "checkpoint-3" / "config.json").read_text())["state_sizes"] == [12, 12]
    resumed = _check_resume(out, 3, reference)
    assert resumed["begin_history"] == []


def test_kill_while_writing_a_checkpoint(crashed, reference):
    # checkpoint-6: weights written, no optimizer, no trainer_state.json
    out = _crash(crashed, "mid_save")
    partial = out / "checkpoint-6"
    assert partial.is_dir() and (partial / "model.safetensors").exists()
    assert not (partial / "trainer_state.json").exists()
    # transformers alone would resume from the half-written folder
    assert get_last_checkpoint(str(out)) == str(partial)
    assert not is_complete_checkpoint(partial)
    with pytest.warns(UserWarning, match="incomplete checkpoint"):
        _check_resume(out, 3, reference)
    # nothing was deleted: the partial folder was set aside, checkpoint-3 is intact
    assert (out / "checkpoint-6.incomplete" / "model.safetensors").exists()
    assert is_complete_checkpoint(out / "checkpoint-3")
    assert is_complete_checkpoint(out / "checkpoint-9")  # rewritten by the resumed run


def test_kill_inside_on_save(crashed, reference):
    # transformers' files complete, compression_report.json not written yet
    out = _crash(crashed, "on_save")
    ckpt = out / "checkpoint-6"
    assert not (ckpt / "compression_report.json").exists()
    assert is_complete_checkpoint(ckpt)  # the callback state lives in trainer_state.json: usable
    _check_resume(out, 6, reference)
    assert (out / "checkpoint-9" / "compression_report.json").exists()
