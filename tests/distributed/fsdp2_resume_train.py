"""Worker of ``test_fsdp2_resume.py``: FSDP2 training with cuts, a sharded checkpoint after a cut, a SIGKILL, a resume.

Run under torchrun (2 processes, gloo) in one of two phases, over the runs of ``RUNS.json`` (a list of
configurations: ``tests/distributed/fsdp2_train.py``'s ``DEFAULTS`` plus ``save_step``, ``sizes_file``,
``format`` and ``out``)::

    torchrun --nproc_per_node 2 tests/distributed/fsdp2_resume_train.py first RUNS.json
    torchrun --nproc_per_node 2 tests/distributed/fsdp2_resume_train.py resume RUNS.json

``first``: for every run, run C (uninterrupted: steps ``1 .. max_steps``, ``compress_fully_sharded`` at
``steps``) writes ``{out}/C_rank{r}.pt``; then for every run, run A (steps ``1 .. save_step``, ``save_step``
being a cut step) writes the checkpoint ``{out}/checkpoint-{save_step}``: model and optimizer state
(``format="sharded"``: ``state/`` through ``torch.distributed.checkpoint``, every rank its shards;
``"full"``: ``full_state.pt``, rank 0's full state dicts, as accelerate's ``FULL_STATE_DICT``) and, from
rank 0, the sizes
(``sizes_file="report"``: a ``compression_report.json`` of ``build_report``; ``"config"``: the model's
``config.json``), plus ``{out}/A_rank{r}.pt`` (full parameters and moments at the save). After the last save
every rank writes ``killing_rank{r}`` next to ``RUNS.json`` and SIGKILLs itself: the phase never ends
normally.

``resume``: for every run, run B builds the model at its ORIGINAL size, ``resize_to_checkpoint``,
``fully_shard``, builds the optimizer, loads the checkpoint (``get_state_dict`` / ``dcp.load`` /
``set_state_dict``; or ``set_model_state_dict`` / ``set_optimizer_state_dict`` with ``broadcast_from_rank0``)
and trains steps ``save_step + 1 .. max_steps`` (with the cuts scheduled after
``save_step``); writes ``{out}/B_rank{r}.pt``.

Every run uses the same seed, the same global batches per step (rank ``r`` takes its rows, as in
``fsdp2_train.py``), the same AdamW and the same cut helper (``fsdp2_train._cut``).
"""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
    set_state_dict,
)

ROOT = Path(__file__).resolve().parents[2]
for path in (ROOT, Path(__file__).resolve().parent):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

from fsdp2_train import (  # noqa: E402
    DEFAULTS,
    _cut,
    _set_statistics,
    build_model,
    full_moments,
    full_parameters,
    rank_world,
    shard,
)

from compressm_hf import find_reducible_layers  # noqa: E402
from compressm_hf.trainer.report import build_report, write_report  # noqa: E402
from compressm_hf.trainer.resume import resize_to_checkpoint, saved_state_sizes  # noqa: E402
from tests.trainer.toy_ssm import CountingDataset  # noqa: E402

RUN_DEFAULTS = {**DEFAULTS, "save_step": 3, "sizes_file": "report", "format": "sharded"}
FULL_STATE = "full_state.pt"  # format "full": rank 0's full state dicts (accelerate's FULL_STATE_DICT)
FULL_SAVE = StateDictOptions(full_state_dict=True, cpu_offload=True)
FULL_LOAD = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)


def checkpoint_dir(cfg: dict) -> Path:
    return Path(cfg["out"]) / f"checkpoint-{cfg['save_step']}"


def _optimizer(model) -> torch.optim.Optimizer:
    return torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.01)


def train(model, optimizer, cfg: dict, first: int, last: int) -> list[dict]:
    """Optimizer steps ``first .. last`` (1-based) on the global batches of ``fsdp2_train.py``, cutting at
    ``cfg["steps"]``. Returns the cut records (step, sizes before / after)."""
    rank, world = rank_world()
    data = CountingDataset(size=64, seed=0).ids
    layers = find_reducible_layers(model)
    per_rank = cfg["batch"] // world
    cuts = []
    for step in range(first, last + 1):
        _set_statistics(layers, any(0 <= s - step < cfg["statistics_steps"] for s in cfg["steps"]))
        start = (step - 1) * cfg["batch"] % data.shape[0]
        ids = data[start : start + cfg["batch"]][rank * per_rank : (rank + 1) * per_rank]
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step in cfg["steps"]:
            event = _cut(model, optimizer, cfg, step, distributed=True)
            _set_statistics(layers, False, reset=True)
            cuts.append({"step": step, "sizes_before": event.sizes_before, "sizes_after": event.sizes_after})
    return cuts


def _state(model) -> dict:
    return {"sizes": list(model.config.state_sizes), "rank": rank_world()[0], "world": rank_world()[1]}


def run_uninterrupted(cfg: dict) -> None:
    """Run C."""
    model = build_model(cfg)
    shard(model, cfg["wrap"])
    model.train()
    optimizer = _optimizer(model)
    cuts = train(model, optimizer, cfg, 1, cfg["max_steps"])
    result = {**_state(model), "cuts": cuts}
    result.update(params=full_parameters(model), moments=full_moments(model, optimizer))
    torch.save(result, Path(cfg["out"]) / f"C_rank{result['rank']}.pt")


def _write_sizes(model, cfg: dict, cuts: list[dict], original: list[int]) -> None:
    """Rank 0: what the checkpoint was saved at (the report CompreSSMCallback writes, or config.json)."""
    folder = checkpoint_dir(cfg)
    if cfg["sizes_file"] == "report":
        sizes = [int(layer.state_size) for layer in find_reducible_layers(model)]
        report = build_report(
            config={"tau": cfg["tau"], "optimizer_state": cfg["optimizer_state"]},
            schedule_steps=cfg["steps"],
            original_sizes=original,
            final_sizes=sizes,
            events=[{"kind": "reduction", **cut} for cut in cuts],
        )
        write_report(folder, report)
    elif cfg["sizes_file"] == "config":
        model.config.save_pretrained(folder)
    else:
        raise ValueError(f"sizes_file must be 'report' or 'config', got {cfg['sizes_file']!r}")


def save_checkpoint(model, optimizer, cfg: dict) -> None:
    """Model + optimizer state: ``"sharded"``, every rank its shards (``dcp.save`` into ``state/``), or
    ``"full"``, rank 0 the full state dicts (``torch.save``)."""
    folder = checkpoint_dir(cfg)
    if cfg["format"] == "sharded":
        model_sd, optim_sd = get_state_dict(model, optimizer)
        dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(folder / "state"))
    elif cfg["format"] == "full":
        model_sd, optim_sd = get_state_dict(model, optimizer, options=FULL_SAVE)
        if rank_world()[0] == 0:
            folder.mkdir(parents=True, exist_ok=True)
            torch.save({"model": model_sd, "optim": optim_sd}, folder / FULL_STATE)
    else:
        raise ValueError(f"format must be 'sharded' or 'full', got {cfg['format']!r}")


def _full_state(cfg: dict) -> dict:
    """Rank 0: the saved full state dicts; other ranks: empty ones (they receive rank 0's broadcast)."""
    if rank_world()[0] == 0:
        return torch.load(checkpoint_dir(cfg) / FULL_STATE, weights_only=True)
    return {"model": {}, "optim": {}}


def load_checkpoint(model, optimizer, cfg: dict) -> None:
    """The counterpart of :func:`save_checkpoint`, into the sharded ``model`` and its ``optimizer``."""
    if cfg["format"] == "sharded":
        model_sd, optim_sd = get_state_dict(model, optimizer)
        state = {"model": model_sd, "optim": optim_sd}
        dcp.load(state, checkpoint_id=str(checkpoint_dir(cfg) / "state"))
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    else:  # model, then optimizer (as accelerate does); one set_state_dict call with rank 1's empty dicts hangs
        state = _full_state(cfg)
        set_model_state_dict(model, state["model"], options=FULL_LOAD)
        set_optimizer_state_dict(model, optimizer, state["optim"], options=FULL_LOAD)


def run_until_save(cfg: dict) -> None:
    """Run A: train to ``save_step`` (a cut step), write the sharded checkpoint."""
    if cfg["save_step"] not in cfg["steps"]:
        raise ValueError(f"save_step {cfg['save_step']} must be one of the cut steps {cfg['steps']}")
    model = build_model(cfg)
    original = list(model.config.state_sizes)
    shard(model, cfg["wrap"])
    model.train()
    optimizer = _optimizer(model)
    cuts = train(model, optimizer, cfg, 1, cfg["save_step"])
    save_checkpoint(model, optimizer, cfg)
    if rank_world()[0] == 0:
        _write_sizes(model, cfg, cuts, original)
    result = {**_state(model), "cuts": cuts}
    result.update(params=full_parameters(model), moments=full_moments(model, optimizer))
    torch.save(result, Path(cfg["out"]) / f"A_rank{result['rank']}.pt")
    torch.distributed.barrier()


def load_without_resize(cfg: dict) -> str | None:
    """The control: the sharded checkpoint loaded into the model sharded at its ORIGINAL size (what the Trainer
    would do without :func:`resize_to_checkpoint`). Returns the error (``None`` if it loaded). Format
    ``"sharded"`` only: DCP raises the same ``CheckpointException`` on every rank, whereas a full state dict
    broadcast into the wrong shapes fails on some ranks only (the others wait in the broadcast)."""
    model = build_model(cfg)
    shard(model, cfg["wrap"])
    try:
        dcp.load({"model": get_model_state_dict(model)}, checkpoint_id=str(checkpoint_dir(cfg) / "state"))
    except CheckpointException as exc:  # a BaseException: every rank's errors, raised on every rank
        return f"{type(exc).__name__}: {exc}"
    return None


def run_resumed(cfg: dict) -> None:
    """Run B: original size -> resize_to_checkpoint -> fully_shard -> optimizer -> load -> train to the end."""
    folder = checkpoint_dir(cfg)
    model = build_model(cfg)
    built = list(model.config.state_sizes)
    resized = resize_to_checkpoint(model, folder)
    shard(model, cfg["wrap"])
    try:
        resize_to_checkpoint(model, folder)
        refused = None
    except ValueError as exc:
        refused = str(exc)
    model.train()
    optimizer = _optimizer(model)
    load_checkpoint(model, optimizer, cfg)
    loaded = {"params": full_parameters(model), "moments": full_moments(model, optimizer)}
    cuts = train(model, optimizer, cfg, cfg["save_step"] + 1, cfg["max_steps"])
    result = {
        **_state(model),
        "built_sizes": built,
        "resized_sizes": resized,
        "saved_sizes": saved_state_sizes(folder),
        "refused_after_shard": refused,
        "without_resize": load_without_resize(cfg) if cfg["format"] == "sharded" else None,
        "loaded": loaded,
        "cuts": cuts,
        "params": full_parameters(model),
        "moments": full_moments(model, optimizer),
    }
    torch.save(result, Path(cfg["out"]) / f"B_rank{result['rank']}.pt")


def main(argv: list[str]) -> None:
    phase, spec = argv[0], argv[1]
    runs = [{**RUN_DEFAULTS, **cfg} for cfg in json.loads(Path(spec).read_text())]
    torch.distributed.init_process_group("gloo")
    for cfg in runs:
        Path(cfg["out"]).mkdir(parents=True, exist_ok=True)
    if phase == "first":
        for cfg in runs:
            run_uninterrupted(cfg)
        for cfg in runs:
            run_until_save(cfg)
        marker = Path(spec).parent / f"killing_rank{rank_world()[0]}"
        marker.write_text("every checkpoint is saved; SIGKILL now\n")
        os.kill(os.getpid(), signal.SIGKILL)  # a crash right after the last checkpoint: no cleanup at all
    elif phase == "resume":
        for cfg in runs:
            run_resumed(cfg)
        torch.distributed.destroy_process_group()
    else:
        raise ValueError(f"phase must be 'first' or 'resume', got {phase!r}")


if __name__ == "__main__":
    torch.set_num_threads(1)
    main(sys.argv[1:])
