"""report.md of a diffusion run (DreamBooth or text-to-image): what ran, the loss terms over the first and last
steps, the fixed-seed grids and loss.png, any measurements, the config."""

from __future__ import annotations

from pathlib import Path

from tunesmith.atomic import atomic_write_text


def loss_table(rows: list[dict]) -> list[str]:
    """first-10 / last-10 step means of every `*loss` column."""
    if not rows:
        return []
    head, tail = rows[:10], rows[-10:]
    keys = [k for k in rows[0] if k.endswith("loss")]
    keys = keys if len(keys) > 2 else ["loss"]  # one term is the total
    mean = lambda rs, k: sum(r[k] for r in rs) / len(rs)  # noqa: E731
    lines = ["## Loss", "", "| | first 10 steps | last 10 steps |", "|---|---|---|"]
    lines += [f"| {'total' if k == 'loss' else k.removesuffix('_loss')} | {mean(head, k):.4f} | {mean(tail, k):.4f} |"
              for k in keys]
    return lines + ["", "![loss](loss.png)", ""]


def write_report(run_dir: Path, title: str, facts: list[str], rows: list[dict], prompts: list[str],
                 measures: dict, cfg_text: str, seconds: float) -> Path:
    lines = [f"# {title}", "", *[f"- {fact}" for fact in facts], f"- wall time: {seconds:.1f} s", ""]
    lines += loss_table(rows)
    lines += ["## Samples (fixed seed; rows: " + "; ".join(f"\"{p}\"" for p in prompts) + ")", "",
              "before training: ![before](samples_before.png)", "", "after training: ![after](samples_after.png)", ""]
    if measures:
        lines += ["## Measurements", "", "| measure | before | after |", "|---|---|---|"]
        lines += [f"| {name} | {b:.4f} | {a:.4f} |" for name, (b, a) in measures.items()]
        lines.append("")
    lines += ["## Config", "", "```yaml", cfg_text.rstrip(), "```", ""]
    path = run_dir / "report.md"
    atomic_write_text(path, "\n".join(lines))
    return path
