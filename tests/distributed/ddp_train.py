"""Training driver for the distributed and crash tests (CPU, tiny models, CompreSSMCallback).

Run as a script (one or several processes)::

    torchrun --nproc_per_node 2 tests/distributed/ddp_train.py RUNS.json
    accelerate launch --multi_gpu --num_processes 2 tests/distributed/ddp_train.py RUNS.json
    python tests/distributed/ddp_train.py RUNS.json

``RUNS.json`` holds a list of run configurations (see ``DEFAULTS``); they are trained one after the
other in the same process group. Every rank writes ``{out}/result_rank{rank}.pt`` (final state dict,
sizes, compression history, optimizer state by parameter name, probes). The tests import this file
too and call :func:`run` in-process (single process).

Crash hooks (``crash``: ``{"at": ..., "step": N}``) write ``{out}/CRASH_READY`` and block until the
parent kills the process: ``"before_cut"`` (``on_step_end`` of step N before CompreSSMCallback),
``"after_cut"`` (``on_step_end`` of step N after it), ``"mid_save"`` (inside ``_save_checkpoint`` of
step N: weights written, optimizer and ``trainer_state.json`` not yet), ``"on_save"`` (``on_save`` of
step N before CompreSSMCallback's: transformers' files complete, the compression report not yet).

Stall hook (``stall``: ``{"rank": R, "at": "step_begin" | "before_cut", "step": N}``): rank R writes
``{out}/STALLED_rank{R}`` (its pid) and freezes itself with SIGSTOP at ``on_step_begin`` of the
optimizer step that ends at N, or at ``on_step_end`` of step N before CompreSSMCallback (so the peer
enters the compression step's collectives alone). The parent SIGKILLs it. With ``stall`` set every
rank writes ``{out}/PID_rank{r}`` (pid and process-group timeout) at ``on_train_begin`` and, if
``train()`` raises, ``{out}/ERROR_rank{r}`` (the exception). ``ddp_timeout`` is passed to
``TrainingArguments``.
"""

from __future__ import annotations

import copy
import json
import os
import signal
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from transformers import Trainer, TrainerCallback, TrainingArguments  # noqa: E402

from compressm_hf.trainer import CompreSSMCallback  # noqa: E402
from compressm_hf.trainer.surgery import base_optimizer  # noqa: E402
from tests.trainer.toy_ssm import CountingDataset, ToySSMConfig, ToySSMForCausalLM  # noqa: E402

DEFAULTS = {
    "model": "toy",  # toy | lru | mamba | mamba2
    "state_size": 12,
    "n_groups": 1,  # mamba2 only
    "max_steps": 12,
    "batch": 4,
    "ga": 1,
    "unused": None,  # ddp_find_unused_parameters (None: the Trainer's default, True for these models)
    "mode": "tolerance",
    "tau": 0.1,
    "steps": [3, 6],
    "optimizer_state": "slice",
    "pragmatic_tolerance": 0.02,
    "greater_is_better": None,
    "eval_steps": None,
    "save_steps": None,
    "bf16": False,
    "resume": None,  # True or a checkpoint path
    "crash": None,
    "stall": None,
    "ddp_timeout": None,  # TrainingArguments.ddp_timeout (None: its default)
    "seed": 0,
    "snapshot_steps": [],  # probe copies (model + optimizer) at on_step_end BEFORE the callback
    "after_steps": [],  # ... and at on_evaluate AFTER the callback
}


def rank() -> int:
    return torch.distributed.get_rank() if torch.distributed.is_initialized() else 0


def build_model(cfg):
    torch.manual_seed(cfg["seed"])
    n = cfg["state_size"]
    if cfg["model"] == "toy":
        return ToySSMForCausalLM(ToySSMConfig(state_sizes=[n, n]))
    if cfg["model"] == "lru":
        from compressm_hf.modeling.lru import LRUConfig, LRUForCausalLM

        return LRUForCausalLM(LRUConfig(vocab_size=12, hidden_size=8, num_hidden_layers=2, state_size=n))
    if cfg["model"] == "mamba":
        from compressm_hf.modeling.mamba import CompreSSMMambaConfig, CompreSSMMambaForCausalLM

        config = CompreSSMMambaConfig(
            vocab_size=12, hidden_size=16, num_hidden_layers=2, state_size=n, expand=2, conv_kernel=2
        )
        return CompreSSMMambaForCausalLM(config)
    if cfg["model"] == "mamba2":
        from compressm_hf.modeling.mamba2 import CompreSSMMamba2Config, CompreSSMMamba2ForCausalLM

        config = CompreSSMMamba2Config(  # hidden 32, expand 2 -> 8 heads of 8; chunk 4: 2 chunks per sequence
            vocab_size=12,
            hidden_size=32,
            num_hidden_layers=2,
            state_size=n,
            head_dim=8,
            num_heads=8,
            n_groups=cfg["n_groups"],
            chunk_size=4,
            eos_token_id=None,
        )
        return CompreSSMMamba2ForCausalLM(config)
    raise ValueError(cfg["model"])


def optimizer_by_name(model, optimizer) -> dict:
    opt = base_optimizer(optimizer)
    names = {id(p): n for n, p in model.named_parameters()}
    return {
        names[id(p)]: {
            k: (v.detach().clone() if torch.is_tensor(v) else copy.deepcopy(v)) for k, v in st.items()
        }
        for p, st in opt.state.items()
    }


def untimed(obj):
    """A compression history without its wall-clock fields (they differ from run to run and rank to rank)."""
    if isinstance(obj, dict):
        return {k: untimed(v) for k, v in obj.items() if not k.endswith("time_s")}
    if isinstance(obj, list):
        return [untimed(v) for v in obj]
    return obj


def _copy(model, optimizer) -> dict:
    return {
        "model": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "optimizer": optimizer_by_name(model, optimizer) if optimizer is not None else {},
        "sizes": list(model.config.state_sizes),
    }


def _block(out: str, what: str) -> None:
    tmp = Path(out, "CRASH_READY.tmp")  # written then renamed: the parent never sees a half-written marker
    tmp.write_text(what)
    os.replace(tmp, Path(out, "CRASH_READY"))
    while True:  # the parent sends SIGKILL
        time.sleep(0.05)


def _stall(out: str) -> None:
    tmp = Path(out, f"STALLED_rank{rank()}.tmp")
    tmp.write_text(str(os.getpid()))
    os.replace(tmp, Path(out, f"STALLED_rank{rank()}"))
    os.kill(os.getpid(), signal.SIGSTOP)  # frozen, not dead: its sockets stay open


class Before(TrainerCallback):
    """Placed before CompreSSMCallback."""

    def __init__(self, cfg):
        self.cfg, self.crash, self.stall = cfg, cfg["crash"] or {}, cfg["stall"] or {}
        self.snapshots: dict[int, dict] = {}
        self.begin: dict | None = None

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        self.begin = _copy(model, optimizer)
        self.begin["optimizer_state_dict"] = copy.deepcopy(base_optimizer(optimizer).state_dict())
        self.begin["global_step"] = state.global_step
        if self.stall:
            group = torch.distributed.distributed_c10d._get_default_group()
            timeout = group._get_backend(torch.device("cpu")).options._timeout  # gloo
            info = {"pid": os.getpid(), "pg_timeout_s": timeout.total_seconds()}
            Path(args.output_dir, f"PID_rank{rank()}").write_text(json.dumps(info))

    def _stalls(self, at: str, step: int) -> bool:
        return self.stall.get("at") == at and self.stall["step"] == step and self.stall["rank"] == rank()

    def on_step_begin(self, args, state, control, **kwargs):
        if self._stalls("step_begin", state.global_step + 1):
            _stall(args.output_dir)

    def on_step_end(self, args, state, control, model=None, optimizer=None, **kwargs):
        if state.global_step in self.cfg["snapshot_steps"]:
            self.snapshots[state.global_step] = _copy(model, optimizer)
        if self.crash.get("at") == "before_cut" and state.global_step == self.crash["step"]:
            _block(args.output_dir, "before_cut")
        if self._stalls("before_cut", state.global_step):
            _stall(args.output_dir)

    def on_save(self, args, state, control, **kwargs):
        if self.crash.get("at") == "on_save" and state.global_step == self.crash["step"]:
            _block(args.output_dir, "on_save")


class After(TrainerCallback):
    """Placed after CompreSSMCallback."""

    def __init__(self, cfg, cb):
        self.cfg, self.crash, self.cb = cfg, cfg["crash"] or {}, cb
        self.after: dict[int, dict] = {}
        self.begin_history: list | None = None

    def on_train_begin(self, args, state, control, **kwargs):
        self.begin_history = copy.deepcopy(self.cb.history)

    def on_step_end(self, args, state, control, model=None, optimizer=None, **kwargs):
        if self.crash.get("at") == "after_cut" and state.global_step == self.crash["step"]:
            _block(args.output_dir, "after_cut")

    def on_evaluate(self, args, state, control, model=None, optimizer=None, **kwargs):
        if state.global_step in self.cfg["after_steps"]:
            self.after[state.global_step] = _copy(model, optimizer)


class CrashTrainer(Trainer):
    crash: dict = {}

    def _save_optimizer_and_scheduler(self, output_dir):
        if self.crash.get("at") == "mid_save" and self.state.global_step == self.crash["step"]:
            _block(self.args.output_dir, "mid_save")
        return super()._save_optimizer_and_scheduler(output_dir)


def run(cfg: dict) -> dict:
    cfg = {**DEFAULTS, **cfg}
    out = cfg["out"]
    world = int(os.environ.get("WORLD_SIZE", "1"))
    evaluating = cfg["eval_steps"] is not None
    kwargs = dict(
        output_dir=out,
        max_steps=cfg["max_steps"],
        per_device_train_batch_size=cfg["batch"],
        per_device_eval_batch_size=8,
        gradient_accumulation_steps=cfg["ga"],
        learning_rate=1e-2,
        warmup_steps=2,
        weight_decay=0.01,
        use_cpu=True,
        report_to="none",
        disable_tqdm=True,
        logging_steps=4,
        save_strategy="steps" if cfg["save_steps"] else "no",
        save_steps=cfg["save_steps"] or 500,
        eval_strategy="steps" if evaluating else "no",
        eval_steps=cfg["eval_steps"],
        seed=cfg["seed"],
        data_seed=cfg["seed"],
        dataloader_num_workers=0,
        bf16=cfg["bf16"],
    )
    if cfg["ddp_timeout"] is not None:
        kwargs["ddp_timeout"] = cfg["ddp_timeout"]
    if world > 1:
        kwargs["ddp_backend"] = "gloo"
        if cfg["unused"] is not None:
            kwargs["ddp_find_unused_parameters"] = cfg["unused"]
    args = TrainingArguments(**kwargs)
    model = build_model(cfg)
    cb = CompreSSMCallback(
        tau=cfg["tau"],
        mode=cfg["mode"],
        steps=cfg["steps"],
        optimizer_state=cfg["optimizer_state"],
        pragmatic_tolerance=cfg["pragmatic_tolerance"],
        greater_is_better=cfg["greater_is_better"],
        statistics_steps=2,
    )
    before, after = Before(cfg), After(cfg, cb)
    trainer = CrashTrainer(
        model=model,
        args=args,
        train_dataset=CountingDataset(size=64, seed=0),
        eval_dataset=CountingDataset(size=16, seed=1) if evaluating else None,
        callbacks=[before, cb, after],
    )
    trainer.crash = cfg["crash"] or {}
    trainer.model_accepts_loss_kwargs = False  # the models ignore num_items_in_batch: average per micro-batch
    wrapped_at_end = {}

    class Wrapped(TrainerCallback):
        def on_train_end(self, args, state, control, **kw):
            wrapped_at_end["type"] = type(trainer.model_wrapped).__name__
            wrapped_at_end["find_unused"] = getattr(trainer.model_wrapped, "find_unused_parameters", None)

    trainer.add_callback(Wrapped())
    try:
        trainer.train(resume_from_checkpoint=cfg["resume"])
    except BaseException as exc:
        if cfg["stall"]:  # what ended the surviving rank, for the stall test
            Path(out, f"ERROR_rank{rank()}").write_text(f"{type(exc).__name__}: {exc}")
        raise
    result = {
        "name": cfg.get("name"),
        "world": world,
        "rank": rank(),
        "state_dict": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "dtypes": {n: str(p.dtype) for n, p in model.named_parameters()},
        "sizes": list(model.config.state_sizes),
        "history": copy.deepcopy(cb.history),
        "stopped": cb.stopped,
        "optimizer": optimizer_by_name(model, trainer.optimizer),
        "snapshots": before.snapshots,
        "begin": before.begin,
        "begin_history": after.begin_history,
        "after": after.after,
        "wrapped": wrapped_at_end,
        "global_step": trainer.state.global_step,
    }
    torch.save(result, os.path.join(out, f"result_rank{rank()}.pt"))
    return result


def main(argv: list[str]) -> None:
    spec = argv[0]
    runs = json.loads(Path(spec).read_text() if os.path.isfile(spec) else spec)
    for cfg in runs if isinstance(runs, list) else [runs]:
        run(cfg)


if __name__ == "__main__":
    import faulthandler

    faulthandler.register(signal.SIGUSR1)  # a test can ask a blocked rank where it is
    torch.set_num_threads(1)
    main(sys.argv[1:])
