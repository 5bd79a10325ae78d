"""A stalled peer (SIGSTOP, not dead: its sockets stay open) ends the other rank's run within ddp_timeout.

Measured cause of the hang (transformers 5.24, accelerate 1.15, torch 2.13, gloo on CPU): with
``use_cpu=True`` ``TrainingArguments._setup_devices`` does not pass ``ddp_timeout`` to accelerate's
``PartialState``, so the process group keeps torch's 30-minute default and the surviving rank blocks in
whatever collective comes next -- DDP's gradient all-reduce in ``backward`` during normal steps, the
callback's broadcast of the plan at a compression step. gloo's collectives honour the group's timeout.
The callback applies ``ddp_timeout`` to the group (``surgery.apply_ddp_timeout``) and its own
collectives raise ``PeerTimeoutError`` after a barrier that names the missing rank.

Each case costs one 2-process torchrun start (~10 s here) plus the timeout; the test never waits more
than ``_DEADLINE`` for anything and SIGKILLs every process it started.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.distributed.test_ddp_training import BIN, ROOT, SCRIPT, _env, _free_port

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

TIMEOUT = 10  # TrainingArguments.ddp_timeout, seconds
_START = 90  # seconds allowed for the launch to reach the stall point
_DEADLINE = 3 * TIMEOUT  # the surviving rank must have exited this long after the stall

CASES = {
    # rank 1 freezes before the optimizer step that ends at 2: rank 0 waits in DDP's gradient all-reduce
    # (torch's collective, not ours: gloo's own error; which of its two timeout messages appears depends on
    # whether the wait or the connection's own timer fires first, both are the ddp_timeout)
    "ddp_allreduce": (
        {"rank": 1, "at": "step_begin", "step": 2},
        r"Timed out waiting 10000ms|Application timeout caused pair closure",
    ),
    # rank 1 freezes at the compression step: rank 0 waits in the callback's collectives
    "cut_rank1": (
        {"rank": 1, "at": "before_cut", "step": 3},
        r"PeerTimeoutError: CompreSSM: .* on rank 0 of 2 .*process-group timeout 10 s.*rank 1 did not reach the "
        r"barrier within 10 s",
    ),
    # rank 0 (the plan's source) freezes at the compression step: rank 1 waits for it
    "cut_rank0": (
        {"rank": 0, "at": "before_cut", "step": 3},
        r"PeerTimeoutError: CompreSSM: .* on rank 1 of 2 .*process-group timeout 10 s.*rank 0 did not reach the "
        r"barrier within 10 s",
    ),
}


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False
    return state not in ("Z", "X")


def _kill(pid: int | None) -> None:
    if pid is None:
        return
    for sig in (signal.SIGKILL, signal.SIGCONT):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, sig)


def _wait_for(predicate, seconds: float, what: str, log: Path):
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    pytest.fail(f"{what} (waited {seconds:.0f} s); log tail:\n{log.read_text()[-6000:]}")


@pytest.mark.parametrize("case", list(CASES))
def test_stalled_peer_ends_the_run_within_ddp_timeout(case, tmp_path):
    stall, expected = CASES[case]
    out = tmp_path / case
    out.mkdir()
    cfg = {
        "name": case,
        "out": str(out),
        "ddp_timeout": TIMEOUT,
        "max_steps": 6,
        "steps": [3],
        "stall": stall,
    }
    spec = tmp_path / "runs.json"
    spec.write_text(json.dumps([cfg]))
    exe = shutil.which("torchrun", path=str(BIN)) or "torchrun"
    cmd = [exe, "--nproc_per_node", "2", "--master_addr", "127.0.0.1", "--master_port", str(_free_port())]
    log = tmp_path / "log.txt"
    stalled = survivor = None
    survivor_rank = 1 - stall["rank"]
    with open(log, "w") as sink:
        proc = subprocess.Popen(
            [*cmd, str(SCRIPT), str(spec)],
            env=_env(),
            cwd=ROOT,
            stdout=sink,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        marker = out / f"STALLED_rank{stall['rank']}"

        def at_stall():
            if proc.poll() is not None:
                pytest.fail(
                    f"torchrun ended ({proc.returncode}) before the stall:\n{log.read_text()[-6000:]}"
                )
            return marker.exists() and (out / f"PID_rank{survivor_rank}").exists()

        _wait_for(at_stall, _START, "the run did not reach the stall point", log)
        t_stall = time.monotonic()
        stalled = int(marker.read_text())
        info = json.loads((out / f"PID_rank{survivor_rank}").read_text())
        survivor = int(info["pid"])

        _wait_for(
            lambda: not _alive(survivor),
            _DEADLINE,
            f"rank {survivor_rank} still running {_DEADLINE} s after rank {stall['rank']} stalled "
            f"(ddp_timeout={TIMEOUT}, the process group's timeout: {info['pg_timeout_s']} s)",
            log,
        )
        elapsed = time.monotonic() - t_stall
        assert info["pg_timeout_s"] == TIMEOUT, info  # ddp_timeout reached the process group (use_cpu=True)
        assert elapsed >= TIMEOUT - 1, (
            f"rank {survivor_rank} ended {elapsed:.1f} s after the stall, before the timeout"
        )
        error = (out / f"ERROR_rank{survivor_rank}").read_text()
        assert re.search(expected, error, re.S), error
        _kill(stalled)  # torchrun would otherwise wait 30 s for it to honour SIGTERM
        rc = proc.wait(timeout=30)
        assert rc != 0
        assert re.search(rf"exitcode\s*:\s*1 \(pid: {survivor}\)", log.read_text()), log.read_text()[-4000:]
    finally:
        _kill(stalled)
        _kill(survivor)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
