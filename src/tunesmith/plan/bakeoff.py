"""`tunesmith advise --bake-off`: try the candidate methods on a held-out slice within a time budget and compare.

Each candidate brings two callables (built by the CLI, which may reach the training loop and RAG; this module only
plans, runs, compares and writes): `probe()` runs a short measured probe and returns the candidate's planned
seconds; `run()` runs it and returns its own outputs. A candidate whose plan exceeds the time left is skipped and
named. The table's values are the dicts the candidates' runs returned, unchanged; `wall_s` is measured here.
"""

from __future__ import annotations

import io
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

from tunesmith.atomic import atomic_write_bytes, atomic_write_text

# criterion: (column, better: "min" | "max", label)
CRITERIA = [("eval_loss", "min", "held-out loss"), ("exact_match", "max", "exact match"),
            ("f1", "max", "token F1"), ("forgetting_pct", "min", "forgetting (general-text perplexity change)"),
            ("wall_s", "min", "wall time"), ("peak_bytes", "min", "peak memory (planned)"),
            ("trainable", "min", "trainable parameters")]
PICK_RULE = ("the highest token F1 on the held-out questions; ties go to less forgetting, then to the shorter wall "
             "time (without answers to score: the lowest held-out loss)")
OUTPUT_KEYS = ("eval_loss", "exact_match", "f1", "forgetting_pct", "peak_bytes", "trainable", "source")


@dataclass
class Candidate:
    name: str
    probe: Callable[[], float]
    run: Callable[[], dict]
    skip_reason: str | None = None  # known before any probe (e.g. does not fit the memory budget)


@dataclass
class Row:
    name: str
    planned_s: float
    wall_s: float
    eval_loss: float | None = None
    exact_match: float | None = None
    f1: float | None = None
    forgetting_pct: float | None = None
    peak_bytes: int | None = None
    trainable: int | None = None
    source: str | None = None  # where the candidate's own outputs are (a run's summary.json)


@dataclass
class BakeOff:
    budget_s: float
    rows: list[Row] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    winners: dict[str, str] = field(default_factory=dict)
    pick: str | None = None
    rule: str = PICK_RULE

    def as_dict(self) -> dict:
        return {"budget_s": self.budget_s, "rows": [asdict(r) for r in self.rows],
                "skipped": [{"name": n, "why": w} for n, w in self.skipped], "winners": self.winners,
                "pick": self.pick, "rule": self.rule}


def _best(rows: list[Row], column: str, better: str) -> Row | None:
    having = [r for r in rows if getattr(r, column) is not None]
    if not having:
        return None
    sign = 1 if better == "min" else -1
    return min(having, key=lambda r: sign * getattr(r, column))


def choose(rows: list[Row]) -> str | None:
    scored = [r for r in rows if r.f1 is not None]
    if scored:
        return min(scored, key=lambda r: (-r.f1, r.forgetting_pct or 0.0, r.wall_s)).name
    best = _best(rows, "eval_loss", "min")
    return best.name if best else None


def run_bakeoff(candidates: list[Candidate], budget_s: float, progress: bool = True) -> BakeOff:
    """Probe, plan, run or skip each candidate in order, timing each run; then the winners and the pick."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    result = BakeOff(budget_s)
    started = time.perf_counter()
    with Progress(TextColumn("[bold]bake-off[/bold] {task.description}"), BarColumn(), TextColumn("{task.completed}/"
                  "{task.total}"), TimeElapsedColumn(), disable=not progress, transient=True) as bar:
        task = bar.add_task("", total=len(candidates))
        for candidate in candidates:
            bar.update(task, description=candidate.name)
            if candidate.skip_reason:
                result.skipped.append((candidate.name, candidate.skip_reason))
                bar.advance(task)
                continue
            if budget_s - (time.perf_counter() - started) <= 0:
                result.skipped.append((candidate.name, "not probed: the time budget is spent"))
                bar.advance(task)
                continue
            planned = candidate.probe()
            left = budget_s - (time.perf_counter() - started)
            if planned > left:
                result.skipped.append((candidate.name, f"planned {planned:.0f} s from its probe, but {max(left, 0):.0f}"
                                       " s of the time budget are left"))
                bar.advance(task)
                continue
            t0 = time.perf_counter()
            outputs = candidate.run()
            wall = time.perf_counter() - t0
            result.rows.append(Row(candidate.name, planned, wall, **{k: outputs.get(k) for k in OUTPUT_KEYS}))
            bar.advance(task)
    for column, better, _label in CRITERIA:
        best = _best(result.rows, column, better)
        if best is not None:
            result.winners[column] = best.name
    result.pick = choose(result.rows)
    return result


def _fmt(column: str, value) -> str:
    if value is None:
        return "—"
    if column == "peak_bytes":
        return f"{value / 2**30:.2f} GiB"
    if column == "trainable":
        return f"{value:,}"
    if column == "forgetting_pct":
        return f"{value:+.2f} %"
    if column == "wall_s":
        return f"{value:.1f} s"
    return f"{value:.4f}"


def markdown(result: BakeOff) -> str:
    columns = [c for c, _, _ in CRITERIA]
    lines = ["| method | " + " | ".join(label for _, _, label in CRITERIA) + " |",
             "|---|" + "---:|" * len(CRITERIA)]
    for row in result.rows:
        cells = []
        for column in columns:
            text = _fmt(column, getattr(row, column))
            cells.append(f"**{text}**" if result.winners.get(column) == row.name else text)
        lines.append(f"| {row.name}{' ✓' if row.name == result.pick else ''} | " + " | ".join(cells) + " |")
    out = ["# tunesmith bake-off", "", *lines, "",
           f"Bold: the winner of each column. ✓ overall pick: **{result.pick}** — rule: {result.rule}.", ""]
    if result.skipped:
        out += ["Skipped:", ""] + [f"- {name}: {why}" for name, why in result.skipped] + [""]
    out += [f"Time budget {result.budget_s:.0f} s; wall time is each candidate's own run (training, evaluation and "
            "answers), measured; each candidate was planned from a short measured probe first.", ""]
    if any(r.source for r in result.rows):
        out += ["Sources of each row's numbers:", ""] + [f"- {r.name}: {r.source}" for r in result.rows if r.source]
    return "\n".join(out) + "\n"


def bar_chart(result: BakeOff) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(c, label) for c, _, label in CRITERIA if c in ("f1", "eval_loss", "forgetting_pct", "wall_s")
              and any(getattr(r, c) is not None for r in result.rows)]
    fig, axes = plt.subplots(1, max(1, len(panels)), figsize=(3.2 * max(1, len(panels)), 3.6), squeeze=False)
    names = [r.name for r in result.rows]
    for ax, (column, label) in zip(axes[0], panels):
        values = [getattr(r, column) if getattr(r, column) is not None else 0.0 for r in result.rows]
        colors = ["tab:green" if result.winners.get(column) == n else "tab:gray" for n in names]
        ax.bar(range(len(names)), values, color=colors)
        ax.set_xticks(range(len(names)), names, rotation=45, ha="right", fontsize=8)
        ax.set_title(label, fontsize=9)
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle(f"bake-off (pick: {result.pick})", fontsize=10)
    fig.tight_layout()
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=100)
    plt.close(fig)
    return png.getvalue()


def write_bakeoff(result: BakeOff, out_dir: Path) -> dict[str, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": out_dir / "bakeoff.json", "md": out_dir / "bakeoff.md", "png": out_dir / "bakeoff.png"}
    atomic_write_text(paths["json"], json.dumps(result.as_dict(), indent=1))
    atomic_write_text(paths["md"], markdown(result))
    atomic_write_bytes(paths["png"], bar_chart(result))
    return paths
