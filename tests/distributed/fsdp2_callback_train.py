"""Worker of the FSDP2 callback test: ``CompreSSMCallback``'s hooks driven by hand on a ``fully_shard`` model.

transformers' Trainer cannot run FSDP on CPU (``use_cpu=True`` falls back to DDP), so this loop calls the
callback's hooks in the order of ``Trainer._inner_training_loop`` (transformers 5.24)::

    on_init_end, on_train_begin, then per optimizer step:
    on_step_begin -> forward/backward -> on_pre_optimizer_step -> optimizer.step -> on_optimizer_step
    -> zero_grad -> global_step += 1 -> on_step_end -> (the step's loss entry) -> (on_save at save steps)
    and on_train_end at the end.

The callback is bound (``cb.bind(stub)``) to :class:`StubTrainer`, which holds what it reads of a Trainer under
FSDP2. Run under torchrun (2 gloo processes; every block ``fully_shard``-ed, then the root)::

    torchrun --nproc_per_node 2 tests/distributed/fsdp2_callback_train.py RUNS.json

``RUNS.json`` is a list of run configurations (see ``DEFAULTS``). Each rank writes ``{out}/result_rank{r}.pt``:
callback history/health/schedule, ``config.state_sizes`` / ``config.compression``, ``state.log_history``, this
rank's bytes of the SSM layers' parameters + optimizer state around every ``on_step_end``, the full parameters
after training, probe logits, the messages of NonFiniteTrainingWarning; the model is saved by
``save_pretrained_fully_sharded`` to ``{out}/model`` and ``{out}/checkpoint-{save_step}``. A run with
``"pragmatic": true`` only records the error ``on_train_begin`` raises.

Fault hook (``nan``: ``{"rank": R, "step": N}``): right before the callback's ``on_step_end`` of step N, rank R
writes a NaN into its local shard of one parameter (``nan_param``), and puts the value back right after, so the
run itself is not broken by it; the other rank's shards stay finite.
"""

from __future__ import annotations

import os
import sys
import time
import warnings
from pathlib import Path
from types import SimpleNamespace

import torch

ROOT = Path(__file__).resolve().parents[2]
for path in (ROOT, Path(__file__).resolve().parent):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

from ddp_train import build_model  # noqa: E402
from fsdp2_train import full_parameters, rank_world, shard  # noqa: E402
from fsdp2_train import main as run_all  # noqa: E402
from transformers import TrainerControl, TrainerState, TrainingArguments  # noqa: E402

from compressm_hf import find_reducible_layers  # noqa: E402
from compressm_hf.trainer import CompreSSMCallback  # noqa: E402
from compressm_hf.trainer.fsdp2 import local_state_bytes, save_pretrained_fully_sharded  # noqa: E402
from compressm_hf.trainer.health import NonFiniteTrainingWarning  # noqa: E402
from tests.trainer.toy_ssm import CountingDataset  # noqa: E402

DEFAULTS = {
    "model": "lru",  # lru | mamba | mamba2 (ddp_train.build_model)
    "state_size": 12,
    "n_groups": 1,
    "max_steps": 10,
    "batch": 8,  # global batch per optimizer step (each rank takes its half)
    "callback": {"tau": 0.1, "steps": [3, 6]},  # CompreSSMCallback keywords
    "save_step": None,  # a checkpoint-N folder + on_save at this step
    "nan": None,  # {"rank": R, "step": N}: see the module docstring
    "pragmatic": False,
    "seed": 0,
}


class StubTrainer:
    """What ``CompreSSMCallback`` reads of a ``transformers.Trainer`` running FSDP2 (accelerate ``fsdp_version: 2``).

    ``model_wrapped`` is the model itself (FSDP2 shards in place); ``log`` appends ``{**logs, "step": ...}`` to
    ``state.log_history`` as ``Trainer.log`` does.
    """

    eval_dataset = None
    is_fsdp_enabled = True
    is_deepspeed_enabled = False

    def __init__(self, model: torch.nn.Module, state: TrainerState):
        self.model = self.model_wrapped = model
        self.state = state
        self.accelerator = SimpleNamespace(state=SimpleNamespace(fsdp_plugin=SimpleNamespace(fsdp_version=2)))

    def log(self, logs: dict) -> None:
        self.state.log_history.append({**logs, "step": self.state.global_step})


def _event(cb, name: str, args, state, control, **kwargs) -> TrainerControl:
    """``cb.<name>(...)`` as ``transformers.CallbackHandler.call_event`` calls it (a ``None`` result keeps
    ``control``)."""
    result = getattr(cb, name)(args, state, control, **kwargs)
    return control if result is None else result


def _mean_over_ranks(value: torch.Tensor) -> float:
    value = value.detach().clone()
    torch.distributed.all_reduce(value)
    return float(value) / torch.distributed.get_world_size()


def _local_nan_target(model) -> tuple[str, torch.Tensor]:
    """The first SSM-layer parameter whose local shard on this rank is not empty: ``(name, local shard)``."""
    layer_params = {id(p) for layer in find_reducible_layers(model) for p in layer.parameters()}
    for name, p in model.named_parameters():
        local = p.to_local() if hasattr(p, "to_local") else p
        if id(p) in layer_params and local.numel() > 0:
            return name, local
    raise RuntimeError("no SSM-layer parameter has a local shard on this rank")


def _setup(cfg: dict):
    rank, world = rank_world()
    model = build_model(cfg)
    shard(model, "blocks")
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.01)
    args = TrainingArguments(
        output_dir=cfg["out"],
        use_cpu=True,
        report_to="none",
        max_steps=cfg["max_steps"],
        per_device_train_batch_size=cfg["batch"] // world,
        logging_steps=1,
        save_strategy="no",
    )
    state = TrainerState(
        max_steps=cfg["max_steps"], is_world_process_zero=rank == 0, is_local_process_zero=rank == 0
    )
    state.stateful_callbacks = {}
    control = TrainerControl()
    return rank, world, model, optimizer, args, state, control


def _pragmatic(cfg: dict) -> dict:
    """``on_train_begin`` of ``mode="pragmatic"`` on the sharded model: the error it raises."""
    rank, _, model, optimizer, args, state, control = _setup(cfg)
    cb = CompreSSMCallback(mode="pragmatic", steps=[2]).bind(StubTrainer(model, state))
    cb.on_init_end(args, state, control)
    try:
        cb.on_train_begin(args, state, control, model=model, optimizer=optimizer)
    except Exception as exc:  # recorded for the test
        return {"name": cfg.get("name"), "rank": rank, "error": (type(exc).__name__, str(exc))}
    return {"name": cfg.get("name"), "rank": rank, "error": None}


def run(cfg: dict) -> dict:
    cfg = {**DEFAULTS, **cfg}
    if cfg["pragmatic"]:
        return _pragmatic(cfg)
    rank, world, model, optimizer, args, state, control = _setup(cfg)
    stub = StubTrainer(model, state)
    cb = CompreSSMCallback(**cfg["callback"]).bind(stub)
    data = CountingDataset(size=64, seed=0).ids
    per_rank = cfg["batch"] // world
    layers = lambda: find_reducible_layers(model)  # the layers of now (cuts replace their parameters)
    bytes_at, times, nan_param = [], [], None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        control = _event(cb, "on_init_end", args, state, control)
        control = _event(cb, "on_train_begin", args, state, control, model=model, optimizer=optimizer)
        for step in range(1, cfg["max_steps"] + 1):
            t0 = time.perf_counter()
            control = _event(cb, "on_step_begin", args, state, control, model=model, optimizer=optimizer)
            start = (step - 1) * cfg["batch"] % data.shape[0]
            ids = data[start : start + cfg["batch"]][rank * per_rank : (rank + 1) * per_rank]
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            control = _event(
                cb, "on_pre_optimizer_step", args, state, control, model=model, optimizer=optimizer
            )
            optimizer.step()
            control = _event(cb, "on_optimizer_step", args, state, control, model=model, optimizer=optimizer)
            model.zero_grad()
            state.global_step += 1
            state.epoch = step / cfg["max_steps"]
            poison = cfg["nan"] is not None and cfg["nan"]["step"] == step and cfg["nan"]["rank"] == rank
            if poison:
                nan_param, local = _local_nan_target(model)
                kept = local.detach().clone()
                with torch.no_grad():
                    local.view(-1)[0] = float("nan")
            before = local_state_bytes(layers(), optimizer)
            control = _event(cb, "on_step_end", args, state, control, model=model, optimizer=optimizer)
            after = local_state_bytes(layers(), optimizer)
            if poison:
                with torch.no_grad():
                    _local_nan_target(model)[1].copy_(kept)
            bytes_at.append(
                {"step": step, "before": before, "after": after, "sizes": list(model.config.state_sizes)}
            )
            # the step's loss entry (Trainer._maybe_log_save_evaluate; logging_steps=1)
            state.log_history.append({"loss": _mean_over_ranks(loss), "step": step})
            if step == cfg["save_step"]:
                checkpoint = os.path.join(args.output_dir, f"checkpoint-{step}")
                save_pretrained_fully_sharded(model, checkpoint)
                control = _event(cb, "on_save", args, state, control, model=model, optimizer=optimizer)
            times.append(time.perf_counter() - t0)
        control = _event(cb, "on_train_end", args, state, control, model=model, optimizer=optimizer)
    params = full_parameters(model)  # before a forward leaves the units unsharded
    model.eval()
    probe = data[:4]
    with torch.no_grad():
        logits = model(input_ids=probe).logits.detach().clone()
    save_pretrained_fully_sharded(model, os.path.join(cfg["out"], "model"))
    result = {
        "name": cfg.get("name"),
        "rank": rank,
        "world": world,
        "schedule_steps": cb.schedule_steps,
        "done_steps": list(cb.done_steps),
        "history": cb.history,
        "health": cb.health,
        "sizes": [int(layer.state_size) for layer in layers()],
        "config_state_sizes": list(model.config.state_sizes),
        "config_compression": model.config.compression,
        "log_history": state.log_history,
        "bytes": bytes_at,
        "params": params,
        "optimizer_holds_model_params": {id(p) for g in optimizer.param_groups for p in g["params"]}
        == {id(p) for p in model.parameters()},
        "probe": probe,
        "logits": logits,
        "nan_param": nan_param,
        "nonfinite_warnings": [
            str(w.message) for w in caught if issubclass(w.category, NonFiniteTrainingWarning)
        ],
        "step_times": times,
    }
    return result


def run_and_save(cfg: dict) -> None:
    result = run(cfg)
    torch.save(result, os.path.join(cfg["out"], f"result_rank{result['rank']}.pt"))


if __name__ == "__main__":
    torch.set_num_threads(1)
    run_all(sys.argv[1:], run_and_save)
