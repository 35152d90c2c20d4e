"""The run's human-facing outputs: loss.png and report.md (config, data, before/after metrics, samples)."""

from __future__ import annotations

from pathlib import Path

from tunesmith import runlog
from tunesmith.atomic import atomic_write_text


def plot_losses(run_dir: Path) -> Path | None:
    return runlog.plot_losses(run_dir, "loss (nats / token)")


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
