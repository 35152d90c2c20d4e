"""Path arguments say what they expect (`type=PathArg(Expect.FOLDER)`); main() checks every one the chosen command
was given (tunesmith/paths.py) before the command runs, so a path of the wrong kind is one sentence naming the
argument, and nothing is read or written."""

from __future__ import annotations

import argparse
from collections.abc import Callable, Iterator

from tunesmith.paths import Expect, check_path


class PathArg:
    """argparse `type=` of a path argument. The value passes through unchanged; `expect` is what it must be, or a
    function of the parsed arguments that says (an output that is a folder or a file by --format). `named`: the
    value may be NAME=PATH."""

    def __init__(self, expect: Expect | Callable[[argparse.Namespace], Expect], named: bool = False):
        self.expect, self.named = expect, named

    def __call__(self, value: str) -> str:
        return value

    def expected(self, args: argparse.Namespace) -> Expect:
        return self.expect(args) if callable(self.expect) else self.expect

    def path(self, value: str) -> str:
        return value.partition("=")[2] if self.named and "=" in value else value


def name_of(action: argparse.Action) -> str:
    """The argument as the usage line shows it: its long option, or the positional's name."""
    return max(action.option_strings, key=len) if action.option_strings else action.metavar or action.dest


def path_actions(parser: argparse.ArgumentParser, args: argparse.Namespace | None = None) -> Iterator[argparse.Action]:
    """The path arguments of `parser` and of the sub-commands `args` chose (all of them without `args`)."""
    for action in parser._actions:
        if isinstance(action.type, PathArg):
            yield action
        elif isinstance(action, argparse._SubParsersAction):
            chosen = [getattr(args, action.dest, None)] if args is not None else list(action.choices)
            for name in chosen:
                if name is not None:
                    yield from path_actions(action.choices[name], args)


def check_path_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    for action in path_actions(parser, args):
        values = getattr(args, action.dest)
        for value in values if isinstance(values, list) else [] if values is None else [values]:
            check_path(action.type.path(value), action.type.expected(args), name_of(action))
