"""Keep the memory a training process frees for its next step, instead of handing it back to the kernel.

glibc returns a freed block to the kernel when it was mmap'ed (blocks above a threshold that adapts up to 32 MiB)
and trims the heap's free top; the next step's activations then fault fresh pages in again. On this project's CPU
machines (virtual machines) such a page costs 2–8 µs to touch (measured: 1 GiB first touched in 2.0 s, re-touched
in 0.46 s while still in the process, 1.3 s once handed back), and a step of bench/peers.py workload 1 faulted up to
40,000 of them. With mmap held to 32 MiB and trimming off, the steps after the first fault only when the batch is
larger than any before it (measured over steps 2–20: 100,000–175,000 faults before, 16,000–57,000 after). Peak
memory stays the same high-water mark, merely kept (bench/peers.py workload 1: 1.38–1.40 GB with it, 1.39–1.44
without).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import platform
from contextlib import contextmanager

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_MMAP_THRESHOLD_MAX = 32 * 2**20  # glibc's ceiling on 64-bit systems
_applied = False


def keep_freed_memory() -> bool:
    """Set glibc's malloc to keep freed memory in the process; returns whether it applies (glibc only)."""
    global _applied
    if _applied:
        return True
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        mallopt = _mallopt()
    except (OSError, AttributeError):
        return False
    _applied = bool(mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_MAX)) and bool(mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))
    return _applied


def _mallopt():
    mallopt = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return mallopt


_LOADING_MMAP_THRESHOLD = 2**20


@contextmanager
def large_blocks_returned():
    """While loading weights: blocks of 1 MiB and more are mmap'ed, so that each freed conversion buffer goes back
    to the kernel instead of staying between the tensors kept (measured: a QLoRA load of SmolLM2 under
    keep_freed_memory held 280 MiB of such holes); afterwards keep_freed_memory's settings again. Where malloc is
    left alone (keep_freed_memory off or not glibc) nothing changes."""
    if not _applied:
        yield
        return
    mallopt = _mallopt()
    mallopt(_M_MMAP_THRESHOLD, _LOADING_MMAP_THRESHOLD)
    try:
        yield
    finally:
        mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_MAX)
