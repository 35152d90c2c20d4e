"""Where training numbers go: metrics.jsonl and TensorBoard event files (tunesmith.runlog) and a rich progress
bar."""

from __future__ import annotations

import time
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from tunesmith.runlog import ScalarLog


class MetricsLogger:
    def __init__(self, run_dir: Path, total_steps: int, start_step: int, console: Console, quiet: bool = False):
        self.scalars = ScalarLog(run_dir, start_step)
        self.console = console
        self.progress = Progress(
            TextColumn("[bold]{task.fields[phase]}"), BarColumn(), MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]}"),
            TextColumn("{task.fields[tps]} tok/s"), TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
            console=console, disable=quiet, transient=False,
        )
        self.task = self.progress.add_task("train", total=total_steps, completed=start_step, loss="-", tps="-",
                                          phase="train")
        self.started = time.perf_counter()

    def __enter__(self):
        self.progress.start()
        return self

    def __exit__(self, *exc):
        self.progress.stop()
        self.scalars.close()

    def log(self, row: dict) -> None:
        self.scalars.write(row)
        step = row["step"]
        if "loss" in row:
            self.progress.update(self.task, completed=step, loss=f"{row['loss']:.4f}", tps=f"{row['tokens_per_s']:.0f}")

    def note(self, text: str) -> None:
        self.progress.console.print(text)

    def compiling(self, on: bool) -> None:
        """The bar says "compiling" while the step that compiles the layers runs."""
        self.progress.update(self.task, phase="compiling" if on else "train")


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

    def compiling(self, on: bool) -> None:
        pass


def metrics_logger(main: bool, run_dir: Path, total_steps: int, start_step: int, console: Console,
                   quiet: bool = False):
    return MetricsLogger(run_dir, total_steps, start_step, console, quiet) if main else SilentLogger()
