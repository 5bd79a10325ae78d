"""compressm-train keeps secrets and local paths off disk and off the Hub, saves when asked, resumes, and
says so when the disk is full."""

from __future__ import annotations

import contextlib
import errno
import io
import json
import shutil
from pathlib import Path

import pytest
import torch

from compressm_hf.cli import train

from .conftest import TINY_MODEL


def run_main(argv):
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = train.main(argv)
    return rc, buf.getvalue()


def base_argv(out: Path, tiny_text: Path, *extra: str) -> list[str]:
    return [
        "--output_dir",
        str(out),
        "--dataset",
        str(tiny_text),
        "--disable_tqdm",
        "true",
        *TINY_MODEL,
        *extra,
    ]


def grep_files(files: dict[str, bytes], needles: list[str]) -> list[tuple[str, str]]:
    """``(file, needle)`` for every needle found in a file's raw bytes (pickles, safetensors, text alike)."""
    return [(name, n) for name, data in files.items() for n in needles if n.encode() in data]


def tree_files(folder: Path) -> dict[str, bytes]:
    return {
        p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()
    }


def hub_files(hub, repo_id: str) -> dict[str, bytes]:
    """Every file of every commit the fake Hub received for ``repo_id``."""
    repo = hub.repos[repo_id]
    return {f"{sha[:8]}:{path}": data for sha, files in repo.commits.items() for path, data in files.items()}


# ------------------------------------------------------------------------------------ secrets (item 2)


def test_hub_token_and_local_paths_never_reach_disk_or_hub(fake_hub, tmp_path, tiny_text, tmp_path_factory):
    out = tmp_path / "tiny-secret"
    argv = base_argv(out, tiny_text, "--save_strategy", "steps", "--save_steps", "4", "--push_to_hub")
    argv += ["--hub_model_id", "user/tiny-secret", "--hub_token", fake_hub.token]
    # trainer_state.json then names the best checkpoint
    argv += ["--load_best_model_at_end", "true", "--metric_for_best_model", "eval_loss"]
    rc, stdout = run_main(argv)
    assert rc == 0, stdout
    assert fake_hub.token not in stdout

    written = tree_files(out)
    # the grep covers the checkpoints and the pickled TrainingArguments
    assert {"checkpoint-4/training_args.bin", "checkpoint-8/optimizer.pt", "training_args.bin"} <= set(
        written
    )
    assert grep_files(written, [fake_hub.token]) == []

    uploaded = hub_files(fake_hub, "user/tiny-secret")
    names = {k.split(":", 1)[1] for k in uploaded}
    assert {"README.md", "model.safetensors", "config.json", "compression_report.json"} <= names
    assert "training_args.bin" not in names  # pickled TrainingArguments: local paths, maybe a token
    local = [str(out), str(out.resolve()), str(tiny_text.parent), str(tmp_path_factory.getbasetemp())]
    assert grep_files(uploaded, [fake_hub.token, *local]) == []

    # what we write for people to read names paths relative to the folder (or just the data file's name)
    for name in ("README.md", "training_summary.txt", "compressm_train_args.json"):
        assert grep_files({name: written[name]}, local) == [], name
    summary = written["training_summary.txt"].decode()
    assert "-> tiny-secret/" in summary.splitlines()[0] and "tiny.txt" in summary.splitlines()[0]
    assert json.loads(written["compressm_train_args.json"])["data"]["dataset"] == "tiny.txt"
    best = json.loads(written["trainer_state.json"])["best_model_checkpoint"]
    assert best in ("checkpoint-4", "checkpoint-8")


# ------------------------------------------------------------------------------ checkpoints (item 5)


def test_save_steps_alone_saves_step_checkpoints(tmp_path, tiny_text):
    out = tmp_path / "o"
    rc, _ = run_main(base_argv(out, tiny_text, "--max_steps", "10", "--save_steps", "10"))
    assert rc == 0
    assert (out / "checkpoint-10" / "trainer_state.json").is_file()


def test_save_steps_with_save_strategy_no_is_a_usage_error(tmp_path, tiny_text, capsys):
    with pytest.raises(SystemExit) as exc:
        train.main(base_argv(tmp_path / "o", tiny_text, "--save_steps", "4", "--save_strategy", "no"))
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "--save_steps 4" in err and "--save_strategy no" in err


def test_save_steps_in_a_config_file_and_cli_defaults(tmp_path):
    path = tmp_path / "cfg.json"
    path.write_text(json.dumps({"output_dir": str(tmp_path / "o"), "save_steps": 25, "max_steps": 50}))
    _, _, _, args = train.parse_args([str(path)])
    assert (args.save_strategy, args.save_steps) == ("steps", 25)
    assert args.hub_strategy == "end" and args.learning_rate == train.TRAINING_DEFAULTS["learning_rate"]
    _, _, _, args = train.parse_args(["--output_dir", str(tmp_path / "o")])
    assert args.save_strategy == "no" and args.hub_strategy == "end" and args.resume_from_checkpoint is None
    _, _, _, args = train.parse_args(
        ["--output_dir", str(tmp_path / "o"), "--resume_from_checkpoint", "False"]
    )
    assert args.resume_from_checkpoint is None


def test_resume_from_an_incomplete_folder_is_a_usage_error(tmp_path, tiny_text, capsys):
    half = tmp_path / "o" / "checkpoint-6"
    half.mkdir(parents=True)
    (half / "optimizer.pt").write_bytes(b"partial")
    with pytest.raises(SystemExit) as exc:
        train.main(base_argv(tmp_path / "o", tiny_text, "--resume_from_checkpoint", str(half)))
    assert exc.value.code == 2
    assert "not a complete checkpoint" in capsys.readouterr().err


def test_resume_true_uses_the_last_complete_checkpoint(tmp_path, tiny_text):
    out = tmp_path / "o"
    argv = base_argv(out, tiny_text, "--save_steps", "2", "--save_total_limit", "10")
    rc, _ = run_main(argv)
    assert rc == 0 and (out / "checkpoint-6").is_dir() and (out / "checkpoint-8").is_dir()
    # a run killed while writing checkpoint-6: no trainer_state.json yet; checkpoint-8 never happened
    shutil.rmtree(out / "checkpoint-8")
    (out / "checkpoint-6" / "trainer_state.json").unlink()
    final_state = out / "trainer_state.json"
    final_state.unlink()

    rc, stdout = run_main([*argv, "--resume_from_checkpoint", "True"])
    assert rc == 0
    assert "resuming from checkpoint-4" in stdout
    assert (out / "checkpoint-6.incomplete").is_dir()  # kept aside, not deleted
    state = json.loads(final_state.read_text())
    assert state["global_step"] == 8
    assert (out / "checkpoint-6" / "trainer_state.json").is_file()  # written again by the resumed run


def test_resume_true_without_a_checkpoint_is_a_clear_error(tmp_path, tiny_text, capsys):
    out = tmp_path / "fresh"
    with pytest.raises(SystemExit) as exc:
        train.main(base_argv(out, tiny_text, "--resume_from_checkpoint", "True"))
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "--resume_from_checkpoint True" in err and str(out) in err and "no complete checkpoint" in err


def test_resume_from_a_missing_folder_is_a_usage_error(tmp_path, tiny_text, capsys):
    missing = tmp_path / "nope" / "checkpoint-3"
    with pytest.raises(SystemExit) as exc:
        train.main(base_argv(tmp_path / "o", tiny_text, "--resume_from_checkpoint", str(missing)))
    assert exc.value.code == 2
    assert str(missing) in capsys.readouterr().err


# ----------------------------------------------------------------------------------- disk full (item 6)

_TORCH_DISK_FULL = (
    "[enforce fail at inline_container.cc:664] . PytorchStreamWriter failed writing file data/0: "
    "file write failed"
)


@pytest.mark.parametrize("how", ["torch.save", "safetensors"])
def test_disk_full_while_saving_is_a_clear_error(how, tmp_path, tiny_text, monkeypatch, capsys):
    import transformers.modeling_utils

    out = tmp_path / "o"
    if how == "torch.save":  # what torch raises when the disk fills up in the middle of optimizer.pt
        real_save = torch.save

        def save(obj, f, *args, **kwargs):
            if "checkpoint-8" in str(f):
                raise RuntimeError(_TORCH_DISK_FULL)
            return real_save(obj, f, *args, **kwargs)

        monkeypatch.setattr(torch, "save", save)
    else:  # the weights of checkpoint-8
        real_safe_save = transformers.modeling_utils.safe_save_file

        def safe_save(tensors, filename, *args, **kwargs):
            if "checkpoint-8" in str(filename):
                raise OSError(errno.ENOSPC, "No space left on device", str(filename))
            return real_safe_save(tensors, filename, *args, **kwargs)

        monkeypatch.setattr(transformers.modeling_utils, "safe_save_file", safe_save)

    rc, _ = run_main(base_argv(out, tiny_text, "--save_steps", "4"))
    assert rc == 1
    err = capsys.readouterr().err
    assert f"compressm-train: error: writing into {out} failed" in err and "Traceback" not in err
    assert "disk is full" in err and str(out) in err
    assert "--resume_from_checkpoint True" in err and "checkpoint-4" in err
