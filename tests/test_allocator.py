"""kernels/allocator.py keeps freed memory in the process. glibc has no undo for mallopt, so the check runs in a
child process: the pytest session's own allocator is never switched."""

import os
import platform
import subprocess
import sys

import pytest
from conftest import REPO

CHILD = """
import sys
import torch
from tunesmith.kernels.allocator import keep_freed_memory

def resident_mib():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 2**20

if sys.argv[1] == "keep":
    assert keep_freed_memory()
activations = [torch.empty(4 * 2**20).fill_(1.0) for _ in range(16)]  # 16 x 16 MiB, an MLP activation's size
held = resident_mib()
del activations
print(held - resident_mib())
"""


def _dropped_mib(mode: str) -> float:
    out = subprocess.run([sys.executable, "-c", CHILD, mode], capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": str(REPO / "src")})
    return float(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's malloc only")
def test_freed_activations_stay_in_the_process_for_the_next_step():
    assert _dropped_mib("keep") < 32  # kept for the next step
    assert _dropped_mib("default") > 200  # glibc's default hands the 256 MiB back: the check can fail
