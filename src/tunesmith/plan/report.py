"""The plan as a rich table, as JSON, and as the one line `tunesmith train` prints and reports."""

from __future__ import annotations

from tunesmith.config import RunConfig
from tunesmith.plan.budget import Advice
from tunesmith.plan.memory import MemoryPlan, gib, mib


def plan_line(memory: MemoryPlan) -> str:
    p = memory.parameters
    what = "peak RSS" if memory.device == "cpu" else "peak allocated"
    return (f"predicted {what} {gib(memory.peak)} ({memory.peak_phase}; {memory.tokens:,} tokens per micro-batch); "
            f"{p.trainable:,} trainable parameters ({100 * p.fraction:.3f} %)")


def plan_dict(cfg: RunConfig, memory: MemoryPlan, budget: int | None = None, advice: Advice | None = None) -> dict:
    p = memory.parameters
    out = {
        "model": cfg.model.path, "method": cfg.method.name, "objective": cfg.objective, "device": memory.device,
        "tokens_per_micro_batch": memory.tokens, "labelled_tokens": memory.batch.labels,
        "tokens_from": memory.batch.source, "peak_bytes": memory.peak, "peak_phase": memory.peak_phase,
        "runtime": {"bytes": memory.runtime.bytes, "detail": memory.runtime.detail},
        "training": [{"name": x.name, "bytes": x.bytes, "detail": x.detail} for x in memory.training],
        "loading": [{"name": x.name, "bytes": x.bytes, "detail": x.detail} for x in memory.loading],
        "parameters": {"trainable": p.trainable, "total": p.total, "fraction": p.fraction,
                       "adapter_file_bytes": p.saved_bytes, "note": p.note,
                       "parts": [{"what": x.what, "formula": x.formula, "each": x.each, "count": x.count,
                                  "total": x.total} for x in p.parts]},
        "notes": memory.notes,
    }
    if advice is not None:
        out["budget"] = {"bytes": budget, "fits": advice.fits, "over_by": advice.over_by,
                         "options": [{"change": o.change, "peak_bytes": o.peak, "fits": o.fits}
                                     for o in advice.options]}
    return out


def print_plan(cfg: RunConfig, memory: MemoryPlan, budget: int | None = None, advice: Advice | None = None) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    p = memory.parameters
    params = Table(title=f"parameters: {cfg.method.name} on {cfg.model.path}")
    for col in ("what", "formula", "each", "count", "total"):
        params.add_column(col, justify="right" if col in ("each", "count", "total") else "left")
    for part in p.parts:
        params.add_row(part.what, part.formula, f"{part.each:,}", str(part.count), f"{part.total:,}")
    params.add_row("[bold]trainable[/bold]", f"{100 * p.fraction:.3f} % of {p.total:,}", "", "", f"{p.trainable:,}")
    console.print(params)
    name = "adapter_model.safetensors" if cfg.method.declaration.artifact == "adapter" else "model weights"
    console.print(f"{name}: {p.saved_bytes:,} bytes ({mib(p.saved_bytes)})" + (f"; {p.note}" if p.note else ""))
    what = "peak RSS" if memory.device == "cpu" else "peak allocated"
    table = Table(title=f"{what} on {memory.device}: {gib(memory.peak)} (at {memory.peak_phase})")
    for col in ("part", "size", "how"):
        table.add_column(col, justify="right" if col == "size" else "left", overflow="fold")
    table.add_row("runtime", mib(memory.runtime.bytes), memory.runtime.detail)
    for part in memory.training:
        table.add_row(part.name, mib(part.bytes), part.detail)
    table.add_row("[bold]training total[/bold]", mib(memory.runtime.bytes + memory.training_total), "")
    table.add_row("[dim]loading phase[/dim]", mib(memory.runtime.bytes + memory.loading_total),
                  "; ".join(x.detail for x in memory.loading))
    console.print(table)
    for note in memory.notes:
        console.print(f"note: {note}")
    print_advice(console, budget, advice)


def print_advice(console, budget: int | None, advice: Advice | None) -> None:
    """Whether the plan fits the budget, and if not, each option's predicted peak."""
    if advice is None:
        return
    if advice.fits:
        console.print(f"[green]fits[/green] the budget of {gib(budget)} ({gib(budget - advice.peak)} to spare)")
        return
    console.print(f"[red]does not fit[/red] the budget of {gib(budget)}: over by {gib(advice.over_by)}")
    for option in advice.options:
        mark = "[green]fits[/green]" if option.fits else "[red]still over[/red]"
        console.print(f"  {option.change}: {gib(option.peak)} {mark}")


def predicted_peak(cfg: RunConfig, device: str, objective=None, examples: list | None = None,
                   pad_id: int | None = None) -> MemoryPlan | None:
    """The plan of a run about to train, or None where the planner does not know the model's layout; a run passes
    its objective and tokenized training examples, so the data is not read twice."""
    from tunesmith.errors import TunesmithError
    from tunesmith.plan.batches import batch_of
    from tunesmith.plan.memory import predict

    try:
        readable = examples is not None and not cfg.objective_declaration.samples
        batch = batch_of(cfg, objective, examples, pad_id) if readable else None
        return predict(cfg, device="cuda" if device == "cuda" else "cpu", batch=batch)
    except TunesmithError:
        return None


def measured_peak(device) -> int:
    """The process's peak so far: RSS on CPU, allocated memory on CUDA."""
    if getattr(device, "type", device) == "cuda":
        import torch

        return torch.cuda.max_memory_allocated()
    from tunesmith.plan.runtime import own_peak_rss

    return own_peak_rss()


def predicted_vs_measured(memory: MemoryPlan | None, device) -> str:
    measured = measured_peak(device)
    if memory is None:
        return f"measured {gib(measured)} (no prediction: the planner does not know this model's layout)"
    error = (memory.peak - measured) / measured
    return f"predicted {gib(memory.peak)}, measured {gib(measured)} ({100 * error:+.1f} %)"
