"""Where training numbers go: metrics.jsonl, TensorBoard event files and a rich progress bar.

metrics.jsonl is appended to, each row flushed and fsynced, so a crash loses at most the row being written (a torn
last line, which readers skip). A resumed run starts from a new file holding the rows up to its checkpoint's step,
renamed into place: the old file is never truncated in place.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from tunesmith.atomic import atomic_write_text

METRICS = "metrics.jsonl"


def read_metrics(run_dir: Path) -> list[dict]:
    path = run_dir / METRICS
    if not path.is_file():
        return []
    text = path.read_text(encoding="utf-8")
    lines = text.split("\n")
    torn = lines.pop()  # "" when the file ends with a newline; else the row a crash cut short
    rows = [json.loads(line) for line in lines if line.strip()]
    if torn.strip():
        try:
            rows.append(json.loads(torn))
        except json.JSONDecodeError:
            pass
    return rows


class MetricsLogger:
    def __init__(self, run_dir: Path, total_steps: int, start_step: int, console: Console, quiet: bool = False):
        self.path = run_dir / METRICS
        kept = [m for m in read_metrics(run_dir) if m.get("step", 0) <= start_step]
        atomic_write_text(self.path, "".join(json.dumps(m) + "\n" for m in kept))
        self._fh = open(self.path, "a", encoding="utf-8")
        from torch.utils.tensorboard import SummaryWriter

        self.tb = SummaryWriter(str(run_dir / "tensorboard"), purge_step=start_step + 1 if start_step else None)
        self.console = console
        self.progress = Progress(
            TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(), TextColumn("loss {task.fields[loss]}"),
            TextColumn("{task.fields[tps]} tok/s"), TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
            console=console, disable=quiet, transient=False,
        )
        self.task = self.progress.add_task("train", total=total_steps, completed=start_step, loss="-", tps="-")
        self.started = time.perf_counter()

    def __enter__(self):
        self.progress.start()
        return self

    def __exit__(self, *exc):
        self.progress.stop()
        self._fh.close()
        self.tb.close()

    def log(self, row: dict) -> None:
        self._fh.write(json.dumps(row) + "\n")
        self._fh.flush()
        os.fsync(self._fh.fileno())
        step = row["step"]
        for key, value in row.items():
            if key != "step" and isinstance(value, (int, float)):
                self.tb.add_scalar(key if "/" in key else f"train/{key}", value, step)
        if "loss" in row:
            self.progress.update(self.task, completed=step, loss=f"{row['loss']:.4f}", tps=f"{row['tokens_per_s']:.0f}")

    def note(self, text: str) -> None:
        self.progress.console.print(text)


class SilentLogger:
    """What the ranks other than the main one log: nothing (the main rank writes the run's files)."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        pass

    def log(self, row: dict) -> None:
        pass

    def note(self, text: str) -> None:
        pass


def metrics_logger(main: bool, run_dir: Path, total_steps: int, start_step: int, console: Console,
                   quiet: bool = False):
    return MetricsLogger(run_dir, total_steps, start_step, console, quiet) if main else SilentLogger()
