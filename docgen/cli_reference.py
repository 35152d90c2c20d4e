"""docs/reference/cli.md from the argument parsers (`tunesmith.cli.build_parser`): every command and sub-command with
its usage line, description and arguments, each command at the anchor `tunesmith-train`, `tunesmith-rag-ask`."""

from __future__ import annotations

import argparse
from collections.abc import Iterator

from docgen.markdown import GENERATED, cell, table
from tunesmith.cli import build_parser

USAGE_WIDTH = 100  # the usage lines are wrapped here, whatever the terminal that generates the page

INTRO = """\
Every command of `tunesmith`, generated from its argument parser (`src/tunesmith/cli/`). `tunesmith COMMAND
--help` prints the same. The configs that `train`, `dreambooth` and `text-to-image` read are in the
[config reference](config.md).
"""


def commands(parser: argparse.ArgumentParser, path: tuple[str, ...] = ("tunesmith",)
             ) -> Iterator[tuple[tuple[str, ...], argparse.ArgumentParser, str]]:
    """(words, parser, one-line help) of `parser` and of every sub-command below it, in the parsers' order."""
    yield path, parser, parser.description or ""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = {a.dest: a.help or "" for a in action._choices_actions}
            for name, sub in action.choices.items():
                for words, found, summary in commands(sub, (*path, name)):
                    yield words, found, summary if found is not sub else helps.get(name, "")


def arguments(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    """The arguments a user gives (not --help, not the sub-command choice)."""
    return [a for a in parser._actions if not isinstance(a, (argparse._HelpAction, argparse._SubParsersAction))
            and a.help != argparse.SUPPRESS]


def missing_help() -> list[str]:
    """Every argument without help, as 'tunesmith generate --dtype'."""
    return [f"{' '.join(words)} {argument_name(a)}" for words, parser, _ in commands(build_parser())
            for a in arguments(parser) if not a.help]


def argument_name(action: argparse.Action) -> str:
    return ", ".join(action.option_strings) if action.option_strings else action.metavar or action.dest


def anchor(words: tuple[str, ...]) -> str:
    return "-".join(words)


def usage(parser: argparse.ArgumentParser) -> str:
    formatter = argparse.HelpFormatter(parser.prog, width=USAGE_WIDTH)
    formatter.add_usage(parser.usage, parser._actions, parser._mutually_exclusive_groups)
    return formatter.format_help().strip()


def _help(action: argparse.Action, prog: str) -> str:
    if not action.help:
        return ""
    params = {**vars(action), "prog": prog}
    if isinstance(params.get("choices"), (list, tuple)):
        params["choices"] = ", ".join(map(str, params["choices"]))
    return action.help % params


def _default(action: argparse.Action) -> str:
    if action.required or (not action.option_strings and action.nargs not in ("?", "*")):
        return "required"
    if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
        return "off" if action.default is False else "on"
    if action.default is None or action.default == []:
        return ""
    if isinstance(action.default, list):
        return "`" + ",".join(map(str, action.default)) + "`"
    return f"`{action.default}`"


def _row(action: argparse.Action, prog: str) -> list[str]:
    metavar = "" if action.nargs == 0 or not action.option_strings else " " + (
        action.metavar or action.dest.upper())
    name = f"`{argument_name(action)}{metavar}`"
    if action.option_strings and action.nargs == 0:
        name = f"`{argument_name(action)}`"
    choices = ", ".join(f"`{c}`" for c in action.choices) if action.choices else ""
    return [name, cell(_help(action, prog)), choices, _default(action)]


def _description(parser: argparse.ArgumentParser) -> list[str]:
    """A description the parser prints as written (RawDescriptionHelpFormatter) stays so, in a text block."""
    if not parser.description:
        return []
    if issubclass(parser.formatter_class, argparse.RawDescriptionHelpFormatter):
        return ["```text", parser.description.strip("\n"), "```", ""]
    return [" ".join(parser.description.split()), ""]


def render() -> str:
    out = [GENERATED, "# Command line", "", INTRO]
    found = list(commands(build_parser()))
    rows = [[f"[`{' '.join(words)}`](#{anchor(words)})", cell(summary)] for words, _, summary in found[1:]]
    out += table(["Command", "What it does"], rows) + [""]
    top_epilog = found[0][1].epilog
    for words, parser, summary in found:
        level = "#" * min(len(words) + 1, 4)
        out += [f"{level} `{' '.join(words)}` {{#{anchor(words)}}}", ""]
        if summary and summary != parser.description:
            out += [cell(summary[0].upper() + summary[1:]).rstrip(".") + ".", ""]
        out += _description(parser)
        out += ["```text", usage(parser), "```", ""]
        rows = [_row(a, parser.prog) for a in arguments(parser)]
        if rows:
            out += table(["Argument", "What it does", "Choices", "Default"], rows) + [""]
        if parser.epilog and (len(words) == 1 or parser.epilog != top_epilog):
            out += [cell(parser.epilog), ""]
    return "\n".join(out).rstrip() + "\n"
