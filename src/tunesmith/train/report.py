"""The run's human-facing outputs: loss.png and report.md (config, data, before/after metrics, samples)."""

from __future__ import annotations

import io
from pathlib import Path

from tunesmith.atomic import atomic_write_bytes, atomic_write_text
from tunesmith.train.logging import read_metrics


def plot_losses(run_dir: Path) -> Path | None:
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
    ax.set_ylabel("loss (nats / token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=110)
    plt.close(fig)
    out = run_dir / "loss.png"
    atomic_write_bytes(out, png.getvalue())
    return out


def _number(value: float | None) -> str:
    return "" if value is None else f"{value:.4f}"


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")[:400]


def write_report(run_dir: Path, summary: dict, config_yaml: str) -> Path:
    lines = ["# tunesmith run report", ""]
    lines += ["## Summary", "", "| | |", "|---|---|"]
    for key, value in summary["facts"].items():
        lines.append(f"| {key} | {value} |")
    if summary.get("before_after"):
        lines += ["", "## Held-out metrics", "", "| metric | before | after | change |", "|---|---|---|---|"]
        for name, (before, after) in summary["before_after"].items():
            change = f"{(after - before) / before * 100:+.1f} %" if before else ""
            lines.append(f"| {name} | {before:.4f} | {after:.4f} | {change} |")
    if summary.get("tasks"):
        lines += ["", "## Tasks", "", "| task | train examples | mixture weight | sampled share | held-out loss before "
                  "| after | change |", "|---|---:|---:|---:|---:|---:|---:|"]
        for name, t in summary["tasks"].items():
            before, after = t["eval_loss_before"], t["eval_loss_after"]
            change = f"{(after - before) / before * 100:+.1f} %" if before and after is not None else ""
            lines.append(f"| {name} | {t['train_examples']} | {t['weight']:.3f} | {_number(t['sampled_share'])} "
                         f"| {_number(before)} | {_number(after)} | {change} |")
    for title, key in (("Held-out prompts", "heldout_samples"), ("Trained prompts", "trained_samples")):
        samples = summary.get(key) or []
        if samples:
            lines += ["", f"## {title}", "", "| prompt | reference | before | after |", "|---|---|---|---|"]
            for s in samples:
                lines.append(f"| {_cell(s['prompt'])} | {_cell(s['reference'])} | {_cell(s['before'])} | {_cell(s['after'])} |")
    if (run_dir / "loss.png").is_file():
        lines += ["", "## Loss", "", "![loss](loss.png)"]
    lines += ["", "## Configuration", "", "```yaml", config_yaml.rstrip(), "```", ""]
    out = run_dir / "report.md"
    atomic_write_text(out, "\n".join(lines))
    return out
