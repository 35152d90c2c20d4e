"""What the command handlers share: the help epilog, notes, a progress bar, and JSONL output files written
atomically."""

from __future__ import annotations

from tunesmith.errors import DataError

EPILOG = ("Reference: every config key in docs/reference/config.md, every command in docs/reference/cli.md "
          "(`make docs-serve` shows the docs as a site). Example configs: examples/.")


def print_notes(notes: list[str]) -> None:
    """What a library call left for the user to read (config/run.py load_config's notes), on stderr."""
    import sys

    for note in notes:
        print(f"note: {note}", file=sys.stderr)


def progress_bar(console):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                    console=console, transient=True)


def write_jsonl(path: str, rows: list[dict]) -> None:
    """Atomically: a temp file beside `path`, fsync, rename."""
    import json
    from pathlib import Path

    from tunesmith.atomic import atomic_write_text

    if Path(path).is_dir():
        raise DataError(f"--out {path}: is a folder; expected a file name")
    atomic_write_text(Path(path), "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
