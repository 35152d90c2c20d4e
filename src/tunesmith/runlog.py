"""A run's numbers on disk, for every kind of run (text, diffusion): metrics.jsonl (one JSON row per step, each
flushed and fsynced, so a crash loses at most the row being written: a torn last line, which readers skip),
TensorBoard event files beside it, and loss.png drawn from the rows."""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

from tunesmith.atomic import atomic_write_bytes, atomic_write_text

METRICS = "metrics.jsonl"


def read_metrics(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / METRICS
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


class ScalarLog:
    """metrics.jsonl + TensorBoard for one run. A resumed run starts from a new file holding the rows up to its
    checkpoint's step, renamed into place (the old file is never truncated in place), and TensorBoard purges the
    steps after it."""

    def __init__(self, run_dir: Path, start_step: int = 0):
        self.path = Path(run_dir) / METRICS
        kept = [m for m in read_metrics(run_dir) if m.get("step", 0) <= start_step]
        atomic_write_text(self.path, "".join(json.dumps(m) + "\n" for m in kept))
        self._fh = open(self.path, "a", encoding="utf-8")
        from torch.utils.tensorboard import SummaryWriter

        self.tb = SummaryWriter(str(Path(run_dir) / "tensorboard"), purge_step=start_step + 1 if start_step else None)

    def write(self, row: dict) -> None:
        self._fh.write(json.dumps(row) + "\n")
        self._fh.flush()
        os.fsync(self._fh.fileno())
        for key, value in row.items():
            if key != "step" and isinstance(value, (int, float)):
                self.tb.add_scalar(key if "/" in key else f"train/{key}", value, row["step"])

    def close(self) -> None:
        self._fh.close()
        self.tb.close()


def plot_losses(run_dir: Path, ylabel: str = "loss") -> Path | None:
    """loss.png: the rows' `loss` by step (and `eval/loss` as points when present); None without rows."""
    rows = read_metrics(run_dir)
    train = [(r["step"], r["loss"]) for r in rows if "loss" in r]
    evals = [(r["step"], r["eval/loss"]) for r in rows if "eval/loss" in r]
    if not train:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(*zip(*train), label="train loss", linewidth=1)
    if evals:
        ax.plot(*zip(*evals), "o-", label="held-out loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=110)
    plt.close(fig)
    out = Path(run_dir) / "loss.png"
    atomic_write_bytes(out, png.getvalue())
    return out
