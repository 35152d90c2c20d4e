"""What a tunesmith process sets for itself, once, before anything computes: `init_process`.

- oneDNN's primitive caches are bounded (kernels/onednn_linear.py). oneDNN reads their capacities at its first
  product, bf16 ones included, so this must come before any product: before the speed options' self-check, which
  runs some before the options apply (unbounded, the demo's peak RSS grew 2.40 -> 3.69 GiB in 60 steps).
- glibc's malloc keeps freed memory for the next step (kernels/allocator.py), where a run asks for it
  (train.keep_freed_memory, on by default). It cannot be undone within the process.
- torch's intra-op threads, where a run names a count (train.threads).

The CLI's entry (cli/__init__.py `main`) calls `init_process()` once before any command runs; `open_run`
(train/run.py) calls it again with the run's own settings, which does only what is not done yet, so library use
without the CLI gets the same ordering.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from tunesmith.kernels import allocator, onednn_linear


@dataclass
class ProcessSettings:
    """What `init_process` has set in this process so far."""
    onednn_caches_bounded: bool = False
    keeps_freed_memory: bool = False
    threads: int | None = None


_done = ProcessSettings()  # the process's own state, recorded: there is one per process


def init_process(threads: int | None = None, keep_freed_memory: bool = False) -> ProcessSettings:
    """Bound oneDNN's caches (the first call only), keep freed memory if asked (glibc), set `threads` if given;
    idempotent. Returns what is set now."""
    if not _done.onednn_caches_bounded:
        onednn_linear.bound_caches()
        _done.onednn_caches_bounded = True
    if keep_freed_memory and not _done.keeps_freed_memory:
        _done.keeps_freed_memory = allocator.keep_freed_memory()
    if threads and threads != _done.threads:
        torch.set_num_threads(threads)
        _done.threads = threads
    return replace(_done)
