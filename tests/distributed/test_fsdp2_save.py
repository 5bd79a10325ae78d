"""``save_pretrained`` on a model sharded in place by FSDP2 (what transformers' Trainer does under FSDP2 with a full
state dict) writes the model's own class: ``auto_map`` names our modeling file, not torch's ``_fsdp_init``, no FSDP
source is copied, and the folder loads with ``trust_remote_code`` to the same logits (one gloo process)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.distributed

HERE = Path(__file__).resolve().parent

SCRIPT = r"""
import json, os, sys
import torch
import torch.distributed as dist
sys.path[:0] = [{root!r}, {here!r}]
from ddp_train import build_model
from fsdp2_train import shard
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str({port}))
dist.init_process_group("gloo", rank=0, world_size=1)
out = {{}}
for name in ("lru", "mamba", "mamba2"):
    torch.manual_seed(0)
    model = build_model({{"model": name, "state_size": 8, "n_groups": 1, "seed": 0}})
    ids = torch.randint(0, 12, (2, 6), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model(ids).logits
    shard(model, "blocks")
    assert type(model).__name__.startswith("FSDP"), type(model)
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    folder = os.path.join({tmp!r}, name)
    model.save_pretrained(folder, state_dict=full)  # the Trainer's FULL_STATE_DICT path
    assert type(model).__name__.startswith("FSDP"), "the instance keeps its sharded class"
    from transformers import AutoModelForCausalLM
    loaded = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)
    with torch.no_grad():
        got = loaded(ids).logits
    out[name] = {{"class": type(loaded).__name__, "max_diff": float((got - ref).abs().max())}}
dist.destroy_process_group()
print("RESULT " + json.dumps(out))
"""


def test_save_pretrained_of_a_fully_sharded_model_records_its_own_class(tmp_path):
    from test_ddp_training import _env, _free_port

    code = SCRIPT.format(root=str(HERE.parents[1]), here=str(HERE), port=_free_port(), tmp=str(tmp_path))
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=_env(), timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.split("RESULT ", 1)[1])
    for name, got in result.items():
        folder = tmp_path / name
        config = json.loads((folder / "config.json").read_text())
        targets = list(config.get("auto_map", {}).values())
        assert targets and not any("fsdp" in t.lower() for t in targets), (name, config.get("auto_map"))
        assert not any("fsdp" in a.lower() for a in config["architectures"]), config["architectures"]
        assert not list(folder.glob("_fsdp*.py")), sorted(p.name for p in folder.iterdir())
        assert not got["class"].startswith("FSDP") and got["max_diff"] <= 1e-6, (name, got)
