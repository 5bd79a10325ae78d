"""No Hub token (and no local path) in what is written or pushed: push_compressed_model and user Trainers."""

from __future__ import annotations

import os

import pytest
import torch
from hub_test_utils import GOOD_TOKEN, TinyTokens, make_report, tiny_model

from compressm_hf.trainer.hub import CompreSSMHubCallback, protect_hub_token, push_compressed_model
from compressm_hf.trainer.model_card import write_model_card


@pytest.fixture(autouse=True)
def _restore_hf_token(monkeypatch):
    """``protect_hub_token`` moves the token into ``HF_TOKEN``: put the variable back after each test."""
    monkeypatch.setenv("HF_TOKEN", "placeholder")
    monkeypatch.delenv("HF_TOKEN")


def _grep(files: dict[str, bytes], needles) -> list[tuple[str, str]]:
    return [(name, n) for name, data in files.items() for n in needles if n.encode() in data]


def _tree(folder) -> dict[str, bytes]:
    return {
        p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()
    }


def _all_commits(hub, repo_id) -> dict[str, bytes]:
    return {
        f"{sha[:8]}:{path}": data
        for sha, files in hub.repos[repo_id].commits.items()
        for path, data in files.items()
    }


def _args(out, **kwargs):
    from transformers import TrainingArguments

    base = dict(
        output_dir=str(out),
        max_steps=2,
        per_device_train_batch_size=4,
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
    )
    return TrainingArguments(**{**base, **kwargs})


def test_push_compressed_model_never_uploads_training_args(fake_hub, tmp_path):
    folder = tmp_path / "saved"
    tiny_model().save_pretrained(folder)
    write_model_card(folder, report=make_report(), repo_id="user/no-args")
    # what an unprotected Trainer leaves: the pickled TrainingArguments, token and local paths inside
    torch.save(_args(folder, hub_token=GOOD_TOKEN), folder / "training_args.bin")
    assert GOOD_TOKEN.encode() in (folder / "training_args.bin").read_bytes()

    push_compressed_model(folder, "user/no-args", token=GOOD_TOKEN)
    files = fake_hub.files("user/no-args")
    assert "training_args.bin" not in files and "model.safetensors" in files
    assert _grep(files, [GOOD_TOKEN, str(tmp_path)]) == []


def test_push_compressed_model_refuses_a_file_holding_the_token(fake_hub, tmp_path):
    folder = tmp_path / "saved"
    tiny_model().save_pretrained(folder)
    (folder / "notes.txt").write_text(f"pushed with {GOOD_TOKEN}\n")
    with pytest.raises(ValueError, match="notes.txt") as info:
        push_compressed_model(folder, "user/leaky", token=GOOD_TOKEN)
    assert GOOD_TOKEN not in str(info.value)  # the message names the file, never the secret
    assert "ignore_patterns" in str(info.value)
    assert "user/leaky" not in fake_hub.repos or fake_hub.files("user/leaky") == {}
    # leaving the file out is the way through
    push_compressed_model(folder, "user/leaky", token=GOOD_TOKEN, ignore_patterns=["notes.txt"])
    assert "notes.txt" not in fake_hub.files("user/leaky")


def test_protect_hub_token_moves_the_token_into_the_environment(tmp_path):
    args = _args(tmp_path / "o", hub_token="hf_move_me")
    assert protect_hub_token(args) == "hf_move_me"
    assert args.hub_token is None and os.environ["HF_TOKEN"] == "hf_move_me"
    assert protect_hub_token(args) is None  # nothing left to move; the environment keeps the token
    assert os.environ["HF_TOKEN"] == "hf_move_me"


def test_user_trainer_with_hub_token_writes_and_pushes_no_token(fake_hub, tmp_path):
    """Trainer(hub_token=...) + CompreSSMHubCallback: checkpoints, output_dir and every push stay token-free."""
    from transformers import Trainer

    out = tmp_path / "out"
    args = _args(
        out,
        save_strategy="steps",
        save_steps=1,
        push_to_hub=True,
        hub_model_id="user/user-trainer",
        hub_strategy="every_save",
        hub_token=GOOD_TOKEN,
    )
    trainer = Trainer(model=tiny_model(), args=args, train_dataset=TinyTokens())
    CompreSSMHubCallback.attach(trainer, model_type_tag="lru")
    trainer.train()
    trainer._finish_current_push()
    trainer.push_to_hub()

    written = _tree(out)
    assert "checkpoint-1/training_args.bin" in written and "training_args.bin" in written
    assert _grep(written, [GOOD_TOKEN]) == []
    uploaded = _all_commits(fake_hub, "user/user-trainer")
    assert any(k.endswith(":model.safetensors") for k in uploaded)  # the pushes still authenticate
    assert _grep(uploaded, [GOOD_TOKEN]) == []


def test_compressm_callback_protects_the_token_at_init(tmp_path):
    from transformers import Trainer

    from compressm_hf import CompreSSMCallback

    args = _args(tmp_path / "o", hub_token="hf_callback_token")
    Trainer(model=tiny_model(), args=args, train_dataset=TinyTokens(), callbacks=[CompreSSMCallback(tau=0.1)])
    assert args.hub_token is None and os.environ["HF_TOKEN"] == "hf_callback_token"
