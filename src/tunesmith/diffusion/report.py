"""report.md of a DreamBooth run: the config, what trained, the losses, the grids and any measurements."""

from __future__ import annotations

from pathlib import Path

from tunesmith.atomic import atomic_write_text


def write_report(run_dir: Path, cfg_text: str, summary: dict) -> Path:
    lines = ["# DreamBooth run", "",
             f"- model: `{summary['model']}` ({summary['space']}, {summary['resolution']}×{summary['resolution']})",
             f"- method: {summary['method']}; trainable parameters {summary['trainable']:,} of {summary['total']:,}",
             f"- instance images: {summary['instance_images']} from `{summary['instance_folder']}`; prompt "
             f"\"{summary['instance_prompt']}\"",
             f"- prior preservation: " + (f"weight {summary['prior_weight']}, {summary['class_images']} class images "
                                          f"for \"{summary['class_prompt']}\" (class_images/)"
                                          if summary["class_images"] else "off"),
             f"- prediction type: {summary['prediction_type']}; steps {summary['steps']}; device {summary['device']}",
             f"- wall time: {summary['seconds']:.1f} s (training {summary['train_seconds']:.1f} s)",
             f"- weights: `{summary['weights']}`", ""]
    if summary.get("first_loss") is not None:
        lines += ["## Loss", "", "| | first 10 steps | last 10 steps |", "|---|---|---|",
                  f"| total | {summary['first_loss']:.4f} | {summary['last_loss']:.4f} |",
                  f"| instance | {summary['first_instance']:.4f} | {summary['last_instance']:.4f} |",
                  f"| prior | {summary['first_prior']:.4f} | {summary['last_prior']:.4f} |", ""]
    lines += ["## Samples (fixed seed; rows: " + "; ".join(f"\"{p}\"" for p in summary["prompts"]) + ")", "",
              "before training: ![before](samples_before.png)", "", "after training: ![after](samples_after.png)", ""]
    if summary.get("measures"):
        lines += ["## Measurements (tunesmith/diffusion/fidelity.py)", "", "| measure | before | after |",
                  "|---|---|---|"]
        lines += [f"| {name} | {b:.4f} | {a:.4f} |" for name, (b, a) in summary["measures"].items()]
        lines.append("")
    lines += ["## Config", "", "```yaml", cfg_text.rstrip(), "```", ""]
    path = run_dir / "report.md"
    atomic_write_text(path, "\n".join(lines))
    return path
