"""A rich progress bar with elapsed time and ETA for the long loops (pretraining, class images, training)."""

from __future__ import annotations

from contextlib import contextmanager


class _Silent:
    def add_task(self, *_a, **_k):
        return 0

    def update(self, *_a, **_k):
        pass


@contextmanager
def bar(quiet: bool = False):
    if quiet:
        yield _Silent()
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  TimeRemainingColumn(), transient=False) as progress:
        yield progress
