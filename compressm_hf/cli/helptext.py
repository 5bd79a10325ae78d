"""``--help`` a person can read: plain text, defaults shown, examples kept as written.

Both CLIs use :class:`HelpFormatter` and pass their parser through :func:`plain_help`, which strips the
reStructuredText/Markdown markup (````x````, ```x```, ``:class:`x```) that docstrings and
``transformers.TrainingArguments`` help strings carry; :func:`examples_epilog` formats the example
command lines shown after the options; :func:`as_flags` words a settings error the way the command line
names the setting.
"""

from __future__ import annotations

import argparse
import re

__all__ = ["HelpFormatter", "as_flags", "examples_epilog", "plain_help", "plain_text"]

_ROLE = re.compile(r":[a-z]+:`~?([^`]+)`")  # :class:`~a.B` -> a.B
_QUOTED = re.compile(r"`{1,2}([^`]*)`{1,2}")  # ``x`` / `x` -> x


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Every option with a default shows it (``None`` is left out: the help says what happens then); the
    description and the epilog (examples) keep their line breaks."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None:
            return action.help
        return super()._get_help_string(action)


def plain_text(text: str | None) -> str | None:
    """``text`` without reST roles and backquotes: ``"see ``x`` and `y`"`` -> ``"see x and y"``."""
    if not text:
        return text
    return _QUOTED.sub(r"\1", _ROLE.sub(r"\1", text))


def plain_help(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Strip markup from the description, epilog, group descriptions and every option's help, in place
    (subcommand parsers included); returns ``parser``."""
    parser.description = plain_text(parser.description)
    for group in parser._action_groups:  # argparse has no public accessor for the groups
        group.description = plain_text(group.description)
    for action in parser._actions:
        if isinstance(action.help, str) and action.help is not argparse.SUPPRESS:
            action.help = plain_text(action.help)
        if isinstance(action, argparse._SubParsersAction):
            for choice in action._choices_actions:
                choice.help = plain_text(choice.help)
            for sub in set(action.choices.values()):
                plain_help(sub)
    return parser


def examples_epilog(examples: list[tuple[str, str]]) -> str:
    """``[(command, what it does), ...]`` as an ``examples:`` block (command, then its explanation)."""
    lines = ["examples:"]
    for command, what in examples:
        lines += [f"  {command}", f"      {what}"]
    return "\n".join(lines)


def as_flags(err: Exception) -> str:
    """A settings error as the command line names it: ``window takes ...`` -> ``--window takes ...`` (when the
    message starts with a :class:`~compressm_hf.CompreSSMConfig` field name)."""
    import dataclasses

    from compressm_hf.settings import CompreSSMConfig

    message = str(err)
    first = message.split(" ", 1)[0]
    return f"--{message}" if first in {f.name for f in dataclasses.fields(CompreSSMConfig)} else message
