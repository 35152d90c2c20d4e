"""`tunesmith` command line. Each command group is a module of this package whose register(subparsers) adds its
sub-commands and returns {command: handler(args) -> exit code}; path arguments say what they expect (cli/paths.py)
and are checked before any handler runs. Errors print one paragraph; --debug shows tracebacks. Handlers import the
heavy libraries, so `--help` stays fast; what those libraries may print is set once before (libraries.py)."""

from __future__ import annotations

import argparse
import importlib
import sys

from tunesmith.cli import libraries
from tunesmith.cli.output import EPILOG
from tunesmith.cli.paths import check_path_arguments
from tunesmith.errors import TunesmithError

GROUPS = ("train", "inference", "merge", "export", "serve", "align", "rag", "quant", "plan", "advise",
          "dreambooth", "text_to_image")


def build_parser(commands: dict | None = None) -> argparse.ArgumentParser:
    """The parser of every command; `commands` (if given) is filled with each command's handler."""
    parser = argparse.ArgumentParser(prog="tunesmith", description="Fine-tune a causal LM into a specialist.",
                                     epilog=EPILOG)
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    parser.add_argument("--verbose", action="store_true",
                        help="show the libraries' own start-up messages, warnings and progress bars "
                        f"(also {libraries.VERBOSE_ENV}=1)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    handlers = {}
    for group in GROUPS:
        handlers.update(importlib.import_module(f"tunesmith.cli.{group}").register(sub))
    if commands is not None:
        commands.update(handlers)
    return parser


def main(argv: list[str] | None = None) -> int:
    commands: dict = {}
    parser = build_parser(commands)
    args = parser.parse_args(argv)
    libraries.setup(libraries.verbose_requested(args.verbose))  # before any command imports one (cli/libraries.py)
    try:
        check_path_arguments(parser, args)
        from tunesmith.kernels.process import init_process

        init_process()  # process-wide settings, once, before any command computes (kernels/process.py)
        return commands[args.command](args)
    except TunesmithError as e:
        if args.debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; the last checkpoint (if any) can be continued with --resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
