"""``compressm_hf.trainer.resume``: the sizes a checkpoint was saved at, and resizing a model to them (one process).

The FSDP2 resume itself (resize, ``fully_shard``, ``torch.distributed.checkpoint`` load, bit-identical end) is
``tests/distributed/test_fsdp2_resume.py``.
"""

from __future__ import annotations

import json
import types

import pytest
import torch

from compressm_hf import find_reducible_layers
from compressm_hf.trainer import resume
from compressm_hf.trainer.report import build_report, write_report
from compressm_hf.trainer.resume import resize_to_checkpoint, saved_state_sizes


def _lru(n: int = 12):
    from compressm_hf.modeling.lru import LRUConfig, LRUForCausalLM

    torch.manual_seed(0)
    return LRUForCausalLM(LRUConfig(vocab_size=12, hidden_size=8, num_hidden_layers=2, state_size=n))


def _mamba(n: int = 8):
    from compressm_hf.modeling.mamba import CompreSSMMambaConfig, CompreSSMMambaForCausalLM

    torch.manual_seed(0)
    config = CompreSSMMambaConfig(
        vocab_size=12, hidden_size=16, num_hidden_layers=2, state_size=n, expand=2, conv_kernel=2
    )
    return CompreSSMMambaForCausalLM(config)


BUILDERS = {"lru": _lru, "mamba": _mamba}


def _report(folder, final_sizes, original_sizes=(12, 12)):
    report = build_report(
        config={"tau": 0.1},
        schedule_steps=[3],
        original_sizes=None if original_sizes is None else list(original_sizes),
        final_sizes=final_sizes,
        events=[],
    )
    write_report(folder, report)


def _shrunk(build, sizes):
    """A model of ``build`` whose layers were resized to ``sizes`` (stands in for one cut by a run)."""
    model = build()
    for layer, n in zip(find_reducible_layers(model), sizes):
        layer.resize_(n)
    return model


# ------------------------------------------------------------------------------------------ saved_state_sizes


def test_sizes_come_from_the_report_first(tmp_path):
    _report(tmp_path, [5, 7])
    (tmp_path / "config.json").write_text(json.dumps({"state_sizes": [12, 12]}))
    assert saved_state_sizes(tmp_path) == [5, 7]


def test_sizes_fall_back_to_config_json(tmp_path):
    _shrunk(_lru, [4, 9]).config.save_pretrained(tmp_path)
    assert saved_state_sizes(tmp_path) == [4, 9]
    _report(tmp_path, None, original_sizes=None)  # a report without final_sizes: config.json still decides
    assert saved_state_sizes(tmp_path) == [4, 9]


def test_report_of_another_name(tmp_path):
    _report(tmp_path / "my_report.json", [3, 2])
    assert saved_state_sizes(tmp_path, report_name="my_report.json") == [3, 2]


def test_missing_folder_or_files_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="does-not-exist"):
        saved_state_sizes(tmp_path / "does-not-exist")
    with pytest.raises(
        FileNotFoundError, match=r"no compression_report.json with final_sizes and no config.json"
    ):
        saved_state_sizes(tmp_path)


@pytest.mark.parametrize(
    "config, match",
    [
        ({"model_type": "llama"}, "has no state_sizes"),
        ({"state_sizes": []}, "non-empty list"),
        ({"state_sizes": [4, 0]}, "integer >= 1"),
        ({"state_sizes": [4, 2.5]}, "integer >= 1"),
        ({"state_sizes": "4,4"}, "non-empty list"),
    ],
)
def test_bad_config_json_is_a_value_error(tmp_path, config, match):
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=match):
        saved_state_sizes(tmp_path)


def test_bad_reports_are_value_errors(tmp_path):
    _report(tmp_path, [3, -1])
    with pytest.raises(ValueError, match=r"final_sizes.*integer >= 1"):
        saved_state_sizes(tmp_path)
    (tmp_path / "compression_report.json").write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(ValueError, match="not a compressm-hf compression report"):
        saved_state_sizes(tmp_path)
    (tmp_path / "compression_report.json").unlink()
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        saved_state_sizes(tmp_path)


# --------------------------------------------------------------------------------------- resize_to_checkpoint


@pytest.mark.parametrize("kind", sorted(BUILDERS))
def test_resize_then_load_the_checkpoint(tmp_path, kind):
    build = BUILDERS[kind]
    saved = _shrunk(build, [3, 5])
    saved.config.save_pretrained(tmp_path)
    model = build()
    assert resize_to_checkpoint(model, tmp_path) == [3, 5]
    assert list(model.config.state_sizes) == [3, 5]
    assert [layer.state_size for layer in find_reducible_layers(model)] == [3, 5]
    want = saved.state_dict()
    assert {k: v.shape for k, v in model.state_dict().items()} == {k: v.shape for k, v in want.items()}
    model.load_state_dict(want, strict=True)  # the shapes are there already: nothing resizes while loading
    for key, value in model.state_dict().items():
        assert torch.equal(value, want[key]), key


def test_layers_at_the_saved_size_are_left_alone(tmp_path):
    model = _lru()
    _report(tmp_path, [12, 6])
    first = find_reducible_layers(model)[0]
    before = {name: p for name, p in first.named_parameters()}
    assert resize_to_checkpoint(model, tmp_path) == [12, 6]
    assert all(p is before[name] for name, p in first.named_parameters())


def test_refuses_larger_sizes_and_changes_nothing(tmp_path):
    model = _shrunk(_lru, [6, 6])
    _report(tmp_path, [4, 9])
    with pytest.raises(ValueError, match=r"layer 1: 6 now, 9 saved.*original size"):
        resize_to_checkpoint(model, tmp_path)
    assert list(model.config.state_sizes) == [6, 6]
    assert [layer.state_size for layer in find_reducible_layers(model)] == [6, 6]


def test_refuses_another_layer_count(tmp_path):
    _report(tmp_path, [4, 4, 4])
    with pytest.raises(ValueError, match=r"saved with 3 reducible layers.*the model has 2"):
        resize_to_checkpoint(_lru(), tmp_path)


def test_refuses_a_sharded_model_and_a_model_without_layers(tmp_path, monkeypatch):
    _report(tmp_path, [4, 4])
    with pytest.raises(ValueError, match="no reducible SSM layer"):
        resize_to_checkpoint(torch.nn.Linear(2, 2), tmp_path)
    # the real fully_shard case runs under torchrun (test_fsdp2_resume.py); here only the refusal's wording
    monkeypatch.setattr(resume, "is_fully_sharded", lambda model: True)
    with pytest.raises(ValueError, match="already fully_shard-ed.*before fully_shard"):
        resize_to_checkpoint(_lru(), tmp_path)


# ------------------------------------------------------------------------------------------ the callback at init


def _fsdp2_trainer(version):
    plugin = types.SimpleNamespace(fsdp_version=version)
    return types.SimpleNamespace(
        accelerator=types.SimpleNamespace(state=types.SimpleNamespace(fsdp_plugin=plugin))
    )


@pytest.mark.parametrize(("version", "resized"), [(2, True), (1, False), (None, False)])
def test_the_callback_resizes_for_an_fsdp2_resume_when_the_trainer_is_built(tmp_path, version, resized):
    from transformers import TrainerControl, TrainerState, TrainingArguments

    from compressm_hf.trainer import CompreSSMCallback

    folder = tmp_path / "checkpoint-3"
    _report(folder, [10, 9])
    (folder / "trainer_state.json").write_text(
        json.dumps({"global_step": 3})
    )  # a complete (sharded) checkpoint
    (folder / "pytorch_model_fsdp_0").mkdir()
    _report(tmp_path / "checkpoint-5", [4, 4])  # half written (no trainer_state.json): set aside, never used
    model = _lru()
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none")
    args.resume_from_checkpoint = str(tmp_path / "checkpoint-3")
    trainer = _fsdp2_trainer(version) if version else types.SimpleNamespace()
    assert resume.resize_for_fsdp2_resume(trainer, args, None) is None
    if version == 1:  # FSDP1 is refused before anything is resized
        with pytest.raises(ValueError, match="cannot run under FSDP1"):
            CompreSSMCallback().bind(trainer).on_init_end(args, TrainerState(), TrainerControl(), model=model)
    else:
        with pytest.warns(UserWarning, match="checkpoint-5 is an incomplete checkpoint"):
            CompreSSMCallback().bind(trainer).on_init_end(args, TrainerState(), TrainerControl(), model=model)
        assert (tmp_path / "checkpoint-5.incomplete").is_dir()
    sizes = [int(layer.state_size) for layer in find_reducible_layers(model)]
    assert sizes == ([10, 9] if resized else [12, 12]) and model.config.state_sizes == sizes
    _report(tmp_path / "checkpoint-7", [4, 4])  # half written, not set aside (yet): nothing to resize from
    args.resume_from_checkpoint = str(tmp_path / "checkpoint-7")
    assert resume.resize_for_fsdp2_resume(_fsdp2_trainer(2), args, _lru()) is None
    args.resume_from_checkpoint = True  # names no folder: nothing to do at init (the README's recipe then)
    assert resume.resize_for_fsdp2_resume(_fsdp2_trainer(2), args, _lru()) is None
