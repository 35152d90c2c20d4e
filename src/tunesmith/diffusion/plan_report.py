"""A diffusion plan (plan.py) as a table, as JSON, and against a memory budget: whether it fits, and which single
changes (a smaller batch, gradient checkpointing, bf16 autocast, LoRA instead of full) would make it, each planned."""

from __future__ import annotations

from tunesmith.diffusion.plan import DiffusionPlan, plan_diffusion
from tunesmith.plan.budget import Advice, add_options
from tunesmith.plan.memory import gib, mib
from tunesmith.plan.report import print_advice


def _changed(cfg, section: str, **changes):
    return cfg.model_copy(update={section: getattr(cfg, section).model_copy(update=changes)})


def candidates(cfg, device: str) -> list[tuple[str, object]]:
    out = []
    batch = cfg.train.batch_size
    while batch > 1:
        batch //= 2
        out.append((f"train.batch_size={batch}", _changed(cfg, "train", batch_size=batch)))
    if not cfg.train.gradient_checkpointing and not (cfg.train.gradient_checkpointing is None and device == "cuda"):
        out.append(("train.gradient_checkpointing=true", _changed(cfg, "train", gradient_checkpointing=True)))
    if cfg.train.precision == "fp32" or (cfg.train.precision == "auto" and device == "cpu"):
        out.append(("train.precision=bf16", _changed(cfg, "train", precision="bf16")))
    if cfg.method.name == "full":
        out.append(("method.name=lora", _changed(cfg, "method", name="lora")))
    return out


def advise(cfg, plan: DiffusionPlan, budget: int) -> Advice:
    advice = Advice(budget, plan.peak)
    if advice.fits:
        return advice
    add_options(advice, candidates(cfg, plan.device), lambda changed: plan_diffusion(changed, plan.device).peak)
    return advice


def plan_dict(plan: DiffusionPlan, budget: int | None = None, advice: Advice | None = None) -> dict:
    out = {"kind": plan.kind, "model": plan.model, "family": plan.family, "method": plan.method,
           "device": plan.device, "resolution": list(plan.resolution), "latent": list(plan.latent),
           "images_per_step": plan.rows, "peak_bytes": plan.peak, "peak_phase": plan.peak_phase,
           "runtime": {"bytes": plan.runtime.bytes, "detail": plan.runtime.detail},
           "phases": [{"name": ph.name, "bytes": ph.total,
                       "parts": [{"name": x.name, "bytes": x.bytes, "detail": x.detail} for x in ph.parts]}
                      for ph in plan.phases],
           "parameters": {"trainable": plan.trainable, "total": plan.total,
                          "components": [{"name": c.name, "class": c.class_name, "parameters": c.parameters,
                                          "trainable": c.trainable, "bytes": c.bytes} for c in plan.components]},
           "notes": plan.notes}
    if advice is not None:
        out["budget"] = {"bytes": budget, "fits": advice.fits, "over_by": advice.over_by,
                         "options": [{"change": o.change, "peak_bytes": o.peak, "fits": o.fits}
                                     for o in advice.options]}
    return out


def print_plan(plan: DiffusionPlan, budget: int | None = None, advice: Advice | None = None) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    params = Table(title=f"parameters: {plan.kind} ({plan.method}) on {plan.model} ({plan.family} pipeline)")
    for col in ("component", "class", "parameters", "trainable"):
        params.add_column(col, justify="right" if col in ("parameters", "trainable") else "left")
    for c in plan.components:
        params.add_row(c.name, c.class_name, f"{c.parameters:,}", f"{c.trainable:,}")
    params.add_row("[bold]total[/bold]", "", f"{plan.total:,}", f"{plan.trainable:,}")
    console.print(params)
    what = "peak RSS" if plan.device == "cpu" else "peak allocated"
    w, h = plan.resolution
    table = Table(title=f"{what} on {plan.device}: {gib(plan.peak)} (at {plan.peak_phase}); {plan.rows} images of "
                  f"{w}×{h} per step")
    for col in ("phase", "part", "size", "how"):
        table.add_column(col, justify="right" if col == "size" else "left", overflow="fold")
    table.add_row("", "runtime", mib(plan.runtime.bytes), plan.runtime.detail)
    shown: set[tuple[str, int]] = set()
    for phase in plan.phases:
        kept = [p for p in phase.parts if (p.name, p.bytes) in shown]
        rows = ([("kept from before", sum(p.bytes for p in kept), ", ".join(p.name for p in kept))] if kept else [])
        rows += [(p.name, p.bytes, p.detail) for p in phase.parts if (p.name, p.bytes) not in shown]
        shown.update((p.name, p.bytes) for p in phase.parts)
        for i, (name, size, detail) in enumerate(rows):
            table.add_row(phase.name if i == 0 else "", name, mib(size), detail)
        table.add_row("", f"[bold]{phase.name} total[/bold]", mib(plan.runtime.bytes + phase.total), "",
                      end_section=True)
    console.print(table)
    for note in plan.notes:
        console.print(f"note: {note}")
    print_advice(console, budget, advice)
