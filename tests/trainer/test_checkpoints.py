"""trainer/checkpoints.py: which checkpoint-N folders a resume can trust (moved from test_crash.py)."""

from __future__ import annotations

from pathlib import Path

from transformers.trainer_utils import get_last_checkpoint

import compressm_hf.trainer.callback as callback_module
from compressm_hf.trainer.checkpoints import (
    is_complete_checkpoint,
    last_complete_checkpoint,
    quarantine_incomplete_checkpoints,
)


def test_checkpoint_integrity_helpers(tmp_path):
    def ckpt(step, files):
        folder = tmp_path / f"checkpoint-{step}"
        folder.mkdir()
        for name, text in files.items():
            (folder / name).write_text(text)
        return folder

    good = ckpt(2, {"trainer_state.json": '{"global_step": 2}', "model.safetensors": "x"})
    ckpt(4, {"trainer_state.json": '{"global_step": 4}'})  # no weights
    ckpt(6, {"trainer_state.json": '{"global_st', "model.safetensors": "x"})  # truncated json
    ckpt(8, {"model.safetensors": "x"})  # killed before trainer_state.json
    (tmp_path / "checkpoint-10").write_text("not a folder")
    assert is_complete_checkpoint(good)
    assert last_complete_checkpoint(tmp_path) == str(good)
    moved = quarantine_incomplete_checkpoints(tmp_path)
    assert [Path(old).name for old, _ in moved] == ["checkpoint-4", "checkpoint-6", "checkpoint-8"]
    assert get_last_checkpoint(str(tmp_path)) == str(good)
    assert (tmp_path / "checkpoint-8.incomplete" / "model.safetensors").exists()
    # a second quarantine of the same step does not overwrite the first
    ckpt(8, {})
    quarantine_incomplete_checkpoints(tmp_path)
    assert (tmp_path / "checkpoint-8.incomplete-1").is_dir()
    assert last_complete_checkpoint(tmp_path / "missing") is None


def test_the_helpers_are_still_importable_from_the_callback_module():
    assert callback_module.is_complete_checkpoint is is_complete_checkpoint
    assert callback_module.last_complete_checkpoint is last_complete_checkpoint
    assert callback_module.quarantine_incomplete_checkpoints is quarantine_incomplete_checkpoints
