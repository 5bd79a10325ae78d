"""CompreSSMConfig: one settings object for the callback, both CLIs and the saved folder."""

from __future__ import annotations

import dataclasses
import json
import re
import textwrap

import pytest
from isolated_python import run_script

from compressm_hf import CompreSSMCallback, CompreSSMConfig, RankPolicy
from compressm_hf.cli import analyze, train
from compressm_hf.settings import InvalidSettingError
from compressm_hf.trainer import CompressionSchedule, defaults

from .common import make_args, make_model, make_trainer

FIELDS = [f.name for f in dataclasses.fields(CompreSSMConfig)]


# ---------------------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    ("kwargs", "names"),
    [
        ({"tau": 1.5}, ["tau", "1.5"]),
        ({"mode": "sloppy"}, ["mode", "'sloppy'", "tolerance"]),
        ({"gate": 0.0}, ["gate", "0.0"]),
        ({"min_state_size": 0}, ["min_state_size", "0"]),  # RankPolicy's min_rank, named as here
        ({"round_to": -2}, ["round_to", "-2"]),
        ({"statistics_steps": 0}, ["statistics_steps", "0"]),
        ({"window": [0.1]}, ["window", "[0.1]"]),
        ({"steps": [0, 5]}, ["positive integers", "[0]"]),
        ({"on_nonfinite": "ignore"}, ["on_nonfinite", "'ignore'", "warn"]),
        ({"report_name": "../r.json"}, ["report_name", "'../r.json'"]),
        ({"greater_is_better": "yes"}, ["greater_is_better", "'yes'"]),
        ({"tau": 0.1, "target_total_state": 8}, ["either tau", "0.1"]),
    ],
)
def test_a_bad_setting_names_itself_and_its_value(kwargs, names):
    with pytest.raises(InvalidSettingError) as info:
        CompreSSMConfig(**kwargs)
    assert isinstance(info.value, ValueError)
    for name in names:
        assert name in str(info.value), (name, str(info.value))
    assert "min_rank" not in str(info.value) and "multiple_of" not in str(info.value)


def test_defaults_are_the_one_set_and_tau_is_resolved_once():
    config = CompreSSMConfig()
    assert (config.tau, config.mode, config.gate, config.statistics_steps) == (
        defaults.TAU,
        defaults.MODE,
        defaults.GATE,
        defaults.STATISTICS_STEPS,
    )
    assert config.schedule == CompressionSchedule()
    assert CompreSSMConfig(mode="fixed").tau is None  # tau only defaults where the rule needs it
    assert CompreSSMConfig(target_mean_state=4).tau is None
    policy = CompreSSMConfig(tau=0.05, min_state_size=3, round_to=4).policy()
    assert policy == RankPolicy(tau=0.05, min_rank=3, multiple_of=4)


# ------------------------------------------------------------------------------------ (de)serialization


def test_to_dict_from_dict_round_trip_is_json_safe():
    config = CompreSSMConfig(tau=0.07, steps=range(3, 10, 3), selection="random", seed=5, round_to=2)
    data = json.loads(json.dumps(config.to_dict()))
    assert data["steps"] == [3, 6, 9] and list(data) == FIELDS
    assert CompreSSMConfig.from_dict(data) == config
    budget = CompreSSMConfig(target_total_state=20, budget_schedule="direct", window=(0.1, 0.3), attempts=2)
    assert CompreSSMConfig.from_dict(json.loads(json.dumps(budget.to_dict()))) == budget
    with pytest.raises(TypeError, match=r"unknown settings \['taus'\]"):
        CompreSSMConfig.from_dict({"taus": [0.1]})


# ------------------------------------------------------------------------------------------ the callback


def test_callback_from_a_config_equals_the_callback_from_keywords():
    kwargs = dict(tau=0.05, steps=[2, 4], gate=0.9, min_state_size=2, optimizer_state="reset", seed=3)
    by_config = CompreSSMCallback(CompreSSMConfig(**kwargs))
    by_keyword = CompreSSMCallback(**kwargs)
    assert by_config.config_dict() == by_keyword.config_dict()
    assert CompreSSMCallback(config=CompreSSMConfig(**kwargs)).config == by_keyword.config
    assert (by_keyword.tau, by_keyword.gate, by_keyword.min_state_size, by_keyword.seed) == (0.05, 0.9, 2, 3)
    assert by_keyword.policy == by_keyword.config.policy()
    assert CompreSSMCallback().config_dict() == CompreSSMCallback(CompreSSMConfig()).config_dict()
    # the old spellings: a CompressionSchedule, a list of steps, a positional tau
    assert CompreSSMCallback(schedule=CompressionSchedule(steps=[4, 2])).config.steps == [2, 4]
    assert CompreSSMCallback(schedule=[3]).schedule == CompressionSchedule(steps=(3,))
    assert CompreSSMCallback(0.05).tau == 0.05


def test_a_config_and_keywords_together_is_a_type_error():
    with pytest.raises(TypeError, match=r"not both.*\['tau'\]"):
        CompreSSMCallback(CompreSSMConfig(), tau=0.2)
    with pytest.raises(TypeError, match=r"unknown CompreSSM setting\(s\) \['taus'\]"):
        CompreSSMCallback(taus=0.2)
    with pytest.raises(TypeError, match="must be a CompreSSMConfig"):
        CompreSSMCallback("0.1")


def test_exported_state_args_are_the_config():
    cb = CompreSSMCallback(target_mean_state=6.0, steps=[2, 3], log_per_layer=False)
    assert cb.state()["args"] == cb.config.to_dict()
    assert CompreSSMCallback(**cb.state()["args"]).config == cb.config


# -------------------------------------------------------------------------------------------- the CLIs


def _flags(help_text: str) -> set[str]:
    return set(re.findall(r"--([a-z_]+)", help_text))


def test_train_help_lists_every_setting_from_the_config():
    text = train.build_parser().format_help()
    compression = text.split("\ncompression (CompreSSM", 1)[1].split("\ndata (", 1)[0]
    owned = set(train.CompressionArguments.__dataclass_fields__) - {
        f.name for f in dataclasses.fields(train.CompressionArguments) if f.init
    }
    assert owned == {"seed", "greater_is_better"}  # from the Trainer's own --seed / --greater_is_better
    for name in FIELDS:
        assert name in _flags(compression if name not in owned else text), name
    for field in dataclasses.fields(CompreSSMConfig):  # the help is the config's own
        if field.name not in owned:
            first_words = " ".join(field.metadata["help"].split()[:3])
            assert first_words in " ".join(compression.split()), field.name


def test_train_defaults_are_the_library_defaults_except_the_documented_overrides(tmp_path):
    _, comp_args, _, training_args = train.parse_args(["--output_dir", str(tmp_path / "o")])
    from_cli = comp_args.to_config(seed=training_args.seed)
    library = dataclasses.replace(CompreSSMConfig(), seed=training_args.seed, **train.COMPRESSION_OVERRIDES)
    assert from_cli == library
    assert comp_args.tau == defaults.CLI_TAU and not comp_args.no_compression
    assert train.make_callback(comp_args, seed=7).config == dataclasses.replace(library, seed=7)


def test_train_parses_the_settings_it_did_not_have_before(tmp_path):
    _, comp_args, _, _ = train.parse_args(
        ["--output_dir", str(tmp_path / "o"), "--target_mean_state", "6", "--on_nonfinite", "stop"]
    )
    config = comp_args.to_config()
    assert (config.tau, config.target_mean_state, config.on_nonfinite) == (None, 6.0, "stop")


def test_analyze_policy_flags_come_from_the_config():
    args = analyze.build_parser().parse_args(["compress", "model", "--output_dir", "o", "--tau", "0.2"])
    config = analyze.settings_from_args(args)
    assert config == CompreSSMConfig(tau=0.2)
    assert config.policy() == RankPolicy(tau=0.2)


# ---------------------------------------------------------------------------------- from a trained folder


def test_from_pretrained_rebuilds_the_config_of_a_trained_folder(tmp_path):
    config = CompreSSMConfig(tau=0.05, steps=[2, 4], gate=0.9, selection="smallest", statistics_steps=2)
    trainer = make_trainer(
        make_model(state_sizes=(12, 12)), make_args(tmp_path, max_steps=5), [CompreSSMCallback(config)]
    )
    trainer.train()
    out = tmp_path / "final"
    trainer.save_model(str(out))
    assert json.loads((out / "config.json").read_text())["compression"]["settings"] == config.to_dict()
    assert CompreSSMConfig.from_pretrained(out) == config
    # without config.json's block, the report in output_dir says the same
    assert CompreSSMConfig.from_pretrained(tmp_path) == config
    with pytest.raises(FileNotFoundError, match="no CompreSSM settings"):
        CompreSSMConfig.from_pretrained(tmp_path / "nowhere")


def test_the_settings_import_without_transformers(tmp_path):
    script = tmp_path / "settings_only.py"
    script.write_text(
        textwrap.dedent(
            """
            import sys
            sys.modules["transformers"] = None  # transformers is not installed
            import compressm_hf
            config = compressm_hf.CompreSSMConfig(tau=0.2, round_to=4)
            assert config.policy().multiple_of == 4
            assert "compressm_hf.trainer.callback" not in sys.modules
            print("OK", config.tau)
            """
        )
    )
    proc = run_script(script, compressm_hf=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "OK 0.2" in proc.stdout
