"""What the command handlers share: the help epilog, a progress bar, and JSONL output files written atomically."""

from __future__ import annotations

from tunesmith.errors import DataError

EPILOG = "Config reference: README.md (section 'Config'). Example configs: examples/."


def progress_bar(console):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                    console=console, transient=True)


def write_jsonl(path: str, rows: list[dict]) -> None:
    """Atomically: a temp file beside `path`, fsync, rename."""
    import json
    import os
    import tempfile
    from pathlib import Path

    dest = Path(path)
    if dest.is_dir():
        raise DataError(f"--out {path}: is a folder; expected a file name")
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", dir=dest.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, dest)
    except BaseException:
        os.unlink(tmp)
        raise
