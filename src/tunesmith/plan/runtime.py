"""The runtime's fixed memory: the peak RSS of a fresh interpreter that has imported torch, transformers and
tunesmith's training loop, before any model exists. Measured once per machine (a subprocess) and cached in
~/.cache/tunesmith/plan-runtime.json, keyed by host, Python, torch and transformers versions."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from pathlib import Path

from tunesmith.atomic import atomic_write_text

PROBE = ("import torch, transformers, tunesmith.train.loop, tunesmith.models\n"
         "from transformers import LlamaForCausalLM, AutoTokenizer\n"
         "import resource; print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)")
ENV = "TUNESMITH_RUNTIME_BYTES"  # overrides the measurement (tests, or a machine where it cannot run)


def cache_file() -> Path:
    root = os.environ.get("TUNESMITH_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "tunesmith")
    return Path(root) / "plan-runtime.json"


def _key() -> str:
    from importlib.metadata import version

    return f"{platform.node()}|{platform.python_version()}|torch {version('torch')}|transformers {version('transformers')}"


def measure() -> int:
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    return int(out.stdout.split()[-1]) if out.returncode == 0 and out.stdout.strip() else 0


def runtime_overhead() -> int:
    if os.environ.get(ENV):
        return int(os.environ[ENV])
    path, key = cache_file(), _key()
    try:
        cached = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        cached = {}
    if key not in cached:
        cached[key] = measure()
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps(cached, indent=1) + "\n")
    return cached[key]
