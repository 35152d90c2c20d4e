"""The raw rows of a bench run: bench/results/<date>-<cpu-slug>.jsonl, append-only, each line flushed and fsynced.

A run writes one header row (kind "header": the CPU as lscpu names it, its vector extensions, torch, transformers,
peft and trl versions, the command line, the settings) and then one row per measurement, every row carrying the
header's run id. bench/report.py builds the README's tables from these rows; a crash loses at most the line being
written, never an earlier one.
"""

from __future__ import annotations

import datetime
import importlib.metadata
import json
import os
import re
import subprocess
import sys
import uuid
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
FLAGS_OF_NOTE = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "avx_vnni", "amx_bf16", "amx_tile",
                 "amx_int8", "neon", "sve")
PACKAGES = ("torch", "transformers", "peft", "trl", "datasets", "accelerate")


def lscpu() -> dict[str, str]:
    """lscpu's fields (name → value); empty where lscpu is missing."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, env={**os.environ, "LC_ALL": "C"}).stdout
    except OSError:
        return {}
    fields = {}
    for line in out.splitlines():
        name, sep, value = line.partition(":")
        if sep:
            fields.setdefault(name.strip(), value.strip())
    return fields


def cpu_summary(fields: dict[str, str] | None = None) -> dict:
    fields = lscpu() if fields is None else fields
    flags = set(fields.get("Flags", "").split())
    return {"model_name": fields.get("Model name", "unknown"), "vendor": fields.get("Vendor ID"),
            "family": fields.get("CPU family"), "model": fields.get("Model"), "cpus": fields.get("CPU(s)"),
            "hypervisor": fields.get("Hypervisor vendor"), "l3": fields.get("L3 cache"),
            "flags_of_note": [f for f in FLAGS_OF_NOTE if f in flags]}


def cpu_slug(cpu: dict) -> str:
    """A file-name-safe name of the CPU: its model name, plus family and model where the name is vague."""
    words = [cpu.get("model_name") or "unknown-cpu"]
    if cpu.get("family"):
        words.append(f"fam{cpu['family']}")
    if cpu.get("model"):
        words.append(f"model{cpu['model']}")
    return re.sub(r"[^a-z0-9]+", "-", " ".join(words).lower()).strip("-") or "unknown-cpu"


def versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {"python": sys.version.split()[0]}
    for name in PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


def default_path(cpu: dict, today: datetime.date | None = None) -> Path:
    return RESULTS / f"{(today or datetime.date.today()).isoformat()}-{cpu_slug(cpu)}.jsonl"


class ResultsLog:
    """Append rows to one results file; `header` starts a run and gives every later row its run id."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.run_id: str | None = None

    def header(self, command: list[str], settings: dict, cpu: dict | None = None) -> dict:
        cpu = cpu_summary() if cpu is None else cpu
        self.run_id = f"{datetime.datetime.now().strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:6]}"
        row = {"kind": "header", "run": self.run_id, "time": datetime.datetime.now().isoformat(timespec="seconds"),
               "cpu": cpu, "os_cpu_count": os.cpu_count(), "versions": versions(), "command": command,
               "settings": settings}
        self._append(row)
        return row

    def row(self, kind: str, **fields) -> dict:
        if self.run_id is None:
            raise RuntimeError("ResultsLog.row before header")
        row = {"kind": kind, "run": self.run_id, **fields}
        self._append(row)
        return row

    def _append(self, row: dict) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        line = json.dumps(row) + "\n"
        with open(self.path, "a+b") as fh:
            if fh.tell() > 0:  # after a torn last line (a crash mid-write) start on a fresh line
                fh.seek(-1, os.SEEK_END)
                if fh.read(1) != b"\n":
                    line = "\n" + line
            fh.write(line.encode("utf-8"))
            fh.flush()
            os.fsync(fh.fileno())


def read_rows(path: Path) -> list[dict]:
    """Every complete row of a results file; a torn last line (a crash mid-write) is skipped."""
    rows = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return rows
