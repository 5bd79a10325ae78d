"""Launch a worker script under ``torchrun --nproc_per_node 2`` over a list of runs and read every rank's result.

The FSDP2 workers (``fsdp2_train.py``, ``fsdp2_callback_train.py``) take a JSON file of run configurations and
write ``{out}/result_rank{r}.pt`` for each run; one launch covers them all (a 2-process start costs 10-20 s here).
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from test_ddp_training import BIN, ROOT, _env, _free_port


def launch_runs(script: Path, runs: dict[str, dict], tmp: Path, timeout: int = 300) -> dict[str, list]:
    """Run ``script`` over ``runs`` (``name -> config``; each gets ``out = tmp/name``) on 2 gloo processes;
    ``name -> [rank 0 result, rank 1 result]``. A failed launch fails the test with the end of its output."""
    configs = [{"name": name, "out": str(tmp / name), **cfg} for name, cfg in runs.items()]
    spec = tmp / "runs.json"
    spec.write_text(json.dumps(configs))
    exe = shutil.which("torchrun", path=str(BIN)) or "torchrun"
    cmd = [exe, "--nproc_per_node", "2", "--master_addr", "127.0.0.1", "--master_port", str(_free_port())]
    proc = subprocess.run(
        [*cmd, str(script), str(spec)], env=_env(), cwd=ROOT, capture_output=True, text=True, timeout=timeout
    )
    if proc.returncode != 0:
        pytest.fail(f"torchrun failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}")
    return {
        name: [torch.load(tmp / name / f"result_rank{r}.pt", weights_only=False) for r in (0, 1)]
        for name in runs
    }


def assert_reloads(folder: Path, result: dict) -> None:
    """The model saved in ``folder`` loads with ``from_pretrained`` at ``result["sizes"]`` with exactly the
    parameters ``result["params"]`` and the logits ``result["logits"]`` on ``result["probe"]``."""
    from transformers import AutoModelForCausalLM

    import compressm_hf  # noqa: F401  (registers the models with the Auto classes)

    model = AutoModelForCausalLM.from_pretrained(folder)
    assert list(model.config.state_sizes) == result["sizes"]
    state = model.state_dict()
    for key, value in result["params"].items():
        assert torch.equal(state[key], value), key
    model.eval()
    with torch.no_grad():
        logits = model(input_ids=result["probe"]).logits
    torch.testing.assert_close(logits, result["logits"], rtol=1e-5, atol=1e-6)
