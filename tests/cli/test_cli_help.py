"""``--help`` a person can read: our groups first, TrainingArguments last, plain text, working examples."""

from __future__ import annotations

import re
import shlex

import pytest

from compressm_hf.cli import analyze, train


def _headings(text: str) -> list[str]:
    """Section titles of an argparse help text (unindented lines ending in ':')."""
    return [line[:-1] for line in text.splitlines() if line.endswith(":") and not line.startswith(" ")]


def _position(headings: list[str], prefix: str) -> int:
    matches = [i for i, h in enumerate(headings) if h.startswith(prefix)]
    assert len(matches) == 1, (prefix, headings)
    return matches[0]


def _examples(text: str, program: str) -> list[list[str]]:
    """The example command lines of the ``examples:`` block that start with ``program``, as argv lists."""
    block = text.split("\nexamples:\n", 1)[1]
    return [shlex.split(line)[1:] for line in block.splitlines() if line.strip().startswith(program + " ")]


def _assert_plain(text: str) -> None:
    assert "``" not in text
    assert not re.search(r"`[^`\n]+`", text), re.findall(r"`[^`\n]+`", text)[:5]
    assert ":class:" not in text and ":func:" not in text


def test_train_help_puts_model_compression_data_first_and_trainer_arguments_last():
    text = train.build_parser().format_help()
    heads = _headings(text)
    order = [
        _position(heads, name)
        for name in (
            "model",
            "compression",
            "data",
            "Trainer arguments (transformers.TrainingArguments",
            "examples",
        )
    ]
    assert order == sorted(order), heads
    assert "options" not in heads  # the Trainer's flags are under their own heading
    trainer_section = text.split("\nTrainer arguments", 1)[1].split("\nexamples:", 1)[0]
    assert "--learning_rate" in trainer_section and "--tau" not in trainer_section
    _assert_plain(text)
    usage = text.split("\n\n", 1)[0]
    assert len(usage.splitlines()) <= 3, usage  # not the 150-option argparse usage dump


def test_train_help_examples_parse(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the default output_dir is relative
    examples = _examples(train.build_parser().format_help(), "compressm-train")
    flags = [argv for argv in examples if argv and argv[0].startswith("--")]
    assert len(flags) >= 2, examples
    for argv in flags:
        train.parse_args(argv)


def test_train_help_from_the_command_line(capsys):
    with pytest.raises(SystemExit) as exc:
        train.main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "examples:" in out and "compression (CompreSSM" in out


@pytest.mark.parametrize("command", [None, "spectrum", "compress"])
def test_analyze_help_is_plain_with_examples(command):
    parser = analyze.build_parser()
    if command is not None:
        parser = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction").choices[
            command
        ]
    text = parser.format_help()
    heads = _headings(text)
    _assert_plain(text)
    assert heads[-1] == "examples", heads
    examples = _examples(text, "compressm-analyze")
    assert examples
    for argv in examples:
        if command is not None:
            assert argv[0] == command
        analyze.build_parser().parse_args(argv)  # every example is a valid command line
    if command is not None:
        policy, data = _position(heads, "rank policy"), _position(heads, "calibration data")
        assert _position(heads, "positional arguments") < policy < data < heads.index("examples")
