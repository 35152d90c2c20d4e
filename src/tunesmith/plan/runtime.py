"""The runtime's fixed memory: the peak RSS of a fresh interpreter that has imported torch, transformers and
tunesmith's training loop, before any model exists. Measured once per machine (a subprocess) and cached in
~/.cache/tunesmith/plan-runtime.json, keyed by host, Python, torch and transformers versions and the probe's version.

A process's own peak is the kernel's high-water mark of its address space (VmHWM in /proc/self/status), not
getrusage's ru_maxrss: Linux carries ru_maxrss across fork and exec, so a child started by a large process (the
planner inside `tunesmith train` after the model is loaded, a test, a bench worker) reports its parent's peak when
its own is smaller. Probe version 1 measured that way and cached 1.6 GiB where the runtime is 0.4 GiB."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from pathlib import Path

from tunesmith.atomic import atomic_write_text
from tunesmith.models import cache_root

PROBE = ("import torch, transformers, tunesmith.train.loop, tunesmith.models\n"
         "from transformers import LlamaForCausalLM, AutoTokenizer\n"
         "from tunesmith.plan.runtime import own_peak_rss; print(own_peak_rss())")
PROBE_VERSION = 2
ENV = "TUNESMITH_RUNTIME_BYTES"  # overrides the measurement (tests, or a machine where it cannot run)


def own_peak_rss() -> int:
    """This process's peak resident memory in bytes (VmHWM where /proc has it, else getrusage)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # macOS reports bytes, Linux KiB


def cache_file() -> Path:
    return cache_root() / "plan-runtime.json"


def _key(probe: str) -> str:
    from importlib.metadata import version

    key = (f"{platform.node()}|{platform.python_version()}|torch {version('torch')}|"
           f"transformers {version('transformers')}|probe {PROBE_VERSION}")
    if probe != PROBE:  # another process's imports (the diffusion planner's): keyed by the probe's text
        import hashlib

        key += f"|{hashlib.sha256(probe.encode()).hexdigest()[:12]}"
    return key


def measure(probe: str = PROBE) -> int:
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    return int(out.stdout.split()[-1]) if out.returncode == 0 and out.stdout.strip() else 0


def runtime_overhead(probe: str = PROBE) -> int:
    """The probe's peak RSS (default: the text training loop's imports), measured once per machine and cached."""
    if os.environ.get(ENV):
        return int(os.environ[ENV])
    path, key = cache_file(), _key(probe)
    try:
        cached = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        cached = {}
    if key not in cached:
        cached[key] = measure(probe)
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps(cached, indent=1) + "\n")
    return cached[key]
