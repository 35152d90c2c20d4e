"""What the training loop (loop.py) sets up and finishes the same way for every objective: the run folder, seeding,
data, model, method and objective, optimizer and schedule, resume, held-out evaluation, the baseline before
training, and the saved artifact with its report."""

from __future__ import annotations

import json
import math
import random
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from rich.console import Console

from tunesmith.atomic import atomic_write_text
from tunesmith.config import RunConfig, dump_config
from tunesmith.config.effective import EFFECTIVE_FILE, effective_yaml, with_change
from tunesmith.context import RunContext
from tunesmith.data.pipeline import Datasets, prompt_and_answer
from tunesmith.data.shared_prefixes import dropout_in
from tunesmith.devices import autocast_for, require_device, to_device
from tunesmith.errors import OutputDirError
from tunesmith.kernels.process import init_process
from tunesmith.methods import get_method, trainable_tokens
from tunesmith.methods.new_tokens import grow_embeddings, grow_tokenizer
from tunesmith.methods.base import count_parameters, parameter_groups
from tunesmith.plan.report import plan_line, predicted_peak, predicted_vs_measured
from tunesmith.train.checkpoint import list_checkpoints, load_checkpoint
from tunesmith.train.fsdp_load import load_for, shard_and_read
from tunesmith.train.forgetting import ForgettingProbe, forgetting_facts, probe_for
from tunesmith.train.vocab_check import check_ids_fit
from tunesmith.train.distributed import OneProcess, ranks_for
from tunesmith.train.report import plot_losses, write_report
from tunesmith.train.self_check import checked_speed_options


@dataclass
class RunResult:
    run_dir: Path
    steps: int
    eval_before: float | None = None
    eval_after: float | None = None
    trainable: int = 0
    total: int = 0
    seconds: float = 0.0
    summary: dict = field(default_factory=dict)
    eval_metrics_before: dict | None = None  # the objective's held-out metrics, loss included
    eval_metrics_after: dict | None = None
    forgetting: dict | None = None  # general-text perplexity before/after (report.forgetting)
    tasks: dict | None = None  # multi-task runs: each task's mixture share and held-out metrics


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def prepare_run_dir(run_dir: Path, overwrite: bool, resume: bool) -> None:
    """Refuse to mix two runs in one folder; nothing is written here."""
    if not run_dir.exists() or not any(run_dir.iterdir()):
        if resume:
            raise OutputDirError(f"output_dir {run_dir}: nothing to resume (no checkpoints there)")
        return
    if resume:
        if not list_checkpoints(run_dir):
            raise OutputDirError(f"output_dir {run_dir}: --resume given but it holds no checkpoint")
        return
    if not overwrite:
        raise OutputDirError(
            f"output_dir {run_dir} already holds a run (or other files). Pass --overwrite to replace it, "
            "--resume to continue it from its last checkpoint, or choose another output_dir."
        )


def make_scheduler(optimizer, schedule: str, warmup: int, total: int):
    def factor(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        if schedule == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
        if schedule == "linear":
            return max(0.0, 1.0 - progress)
        return 1.0

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)



@torch.no_grad()
def evaluate(model, objective, examples: list, cfg: RunConfig, device, pad_id: int, ctx: RunContext, ranks=None
             ) -> dict | None:
    """Held-out loss and the objective's metrics, each averaged over the objective's units (tokens, pairs); in a
    distributed run every rank computes them on the whole held-out set."""
    if not examples:
        return None
    ranks = ranks or OneProcess()
    was_training = model.training
    model.eval()
    total, count, sums = 0.0, 0, {}
    bs = cfg.train.batch_size
    for i in range(0, len(examples), bs):
        batch = to_device(objective.collate(examples[i : i + bs], cfg, pad_id), device)
        with autocast_for(cfg, device):
            loss, n, metrics = ranks.loss_sum(model, objective, batch, ctx)
        total += float(loss)
        count += n
        for key, value in metrics.items():
            sums[key] = sums.get(key, 0.0) + value
    if was_training:
        model.train()
    return {"loss": total / max(count, 1), **{k: v / max(count, 1) for k, v in sums.items()}}


def evaluate_data(model, objective, data: Datasets, cfg: RunConfig, device, pad_id: int, ctx: RunContext,
                  ranks=None) -> dict | None:
    """Held-out metrics over all the eval examples, and in a multi-task run each task's as `<task>/<metric>`."""
    overall = evaluate(model, objective, data.eval, cfg, device, pad_id, ctx, ranks)
    for name, examples in data.task_evals.items():
        for key, value in (evaluate(model, objective, examples, cfg, device, pad_id, ctx, ranks) or {}).items():
            overall[f"{name}/{key}"] = value
    return overall


def sample_generations(model, tokenizer, items: list, n: int, max_new_tokens: int, ctx: RunContext) -> list[dict]:
    from tunesmith.infer.generate import generate_chat

    out = []
    for item in items[:n]:
        split = prompt_and_answer(item)
        if split is None:
            break
        prompt, reference = split
        out.append({"prompt": prompt[-1]["content"], "reference": reference,
                    "output": generate_chat(model, tokenizer, prompt, max_new_tokens, virtual=ctx.virtual(model))})
    return out


@dataclass
class Run:
    """What the loop sets up the same way for every objective."""
    cfg: RunConfig
    console: Console
    run_dir: Path
    device: torch.device
    tokenizer: object
    data: object
    model: torch.nn.Module
    method: object
    objective: object
    pad_id: int
    trainable: int
    total: int
    config_yaml: str
    forgetting: ForgettingProbe | None = None
    ranks: OneProcess = field(default_factory=OneProcess)
    ctx: RunContext = field(default_factory=RunContext)


def open_run(cfg: RunConfig, objective, overwrite: bool, resume: bool, quiet: bool) -> Run:
    """Refuse a clash in output_dir, seed, load data and model, apply the method, prepare the objective, write
    config.yaml (`cfg` as given, never changed) and effective.yaml (what the run changes, and why: the returned
    run's `cfg` is that effective config)."""
    from tunesmith.models import load_tokenizer

    given, changes = cfg, []
    console = Console(stderr=True, quiet=quiet)
    run_dir = Path(cfg.output_dir)
    prepare_run_dir(run_dir, overwrite, resume)
    # before anything computes (kernels/process.py); what the CLI's entry did already is not done twice
    init_process(cfg.train.threads, cfg.train.keep_freed_memory)
    seed_everything(cfg.train.seed)
    device = require_device(cfg.train.device, "train.device")
    ranks = ranks_for(cfg, device, console)
    device = ranks.device(device)
    ranks.barrier()  # every rank has checked output_dir before the main rank writes there
    if not ranks.main:
        console.quiet = True
    elif ranks.world > 1:
        console.print(f"[bold]distributed[/bold] {ranks.strategy} on {ranks.world} ranks: global batch "
                      f"{cfg.train.batch_size} per rank × {ranks.world} ranks × accumulation {cfg.train.grad_accum}")
    if ranks.strategy == "fsdp" and (cfg.report.heldout_samples or cfg.report.trained_samples):
        reason = ("no sample generations under fsdp (generation would need every rank's shards in one process); the "
                  "held-out metrics are reported")
        console.print(f"[bold]report[/bold] {reason}")
        for field_name in ("heldout_samples", "trained_samples"):
            if getattr(cfg.report, field_name):
                cfg = with_change(cfg, f"report.{field_name}", 0, reason, changes)

    if cfg.model.dtype == "auto":
        cfg = with_change(cfg, "model.dtype", *cfg.resolved_dtype(device.type), changes)
        console.print(f"[bold]model[/bold] dtype auto → {changes[-1].effective}: {changes[-1].reason}")
    tokenizer = load_tokenizer(cfg.model.path, cfg.model.trust_remote_code, cfg.model.allow_download)
    growth = grow_tokenizer(tokenizer, cfg.model)
    if cfg.model.added_tokens:
        console.print(f"[bold]tokens[/bold] {growth.summary()}")
    data: Datasets = objective.build_datasets(cfg, tokenizer)
    console.print(f"[bold]data[/bold] train: {data.train_report.summary()}")
    if data.eval_report:
        console.print(f"[bold]data[/bold] eval: {data.eval_report.summary()}")
    forgetting = probe_for(cfg, tokenizer)
    method = get_method(cfg.method.name)
    # a 4-bit base is quantised as it loads, never held whole in full precision first
    place = method.quantize_on_load(cfg.method) if cfg.method.declaration.memory.quantized_base else None
    model, shards_in = load_for(cfg, ranks, console, place)
    grow_embeddings(model, growth)
    check_ids_fit(model, cfg.model.path, {"data.train": data.train, "data.eval": data.eval,
                                          **{f"data.tasks.{name}": evals for name, evals in data.task_evals.items()},
                                          "report.forgetting": forgetting.examples if forgetting else []})
    method.apply(model, cfg.method)
    rows = trainable_tokens.apply_for_run(model, tokenizer, list(growth.added.values()),
                                         cfg.model.trainable_tokens, cfg.method)
    if rows:
        console.print(f"[bold]tokens[/bold] the embedding rows of {len(rows)} tokens train, the rest stays frozen")
    if shards_in:
        shard_and_read(model, ranks, shards_in, device)
    else:
        model.to(device)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    dropout = dropout_in(model) if cfg.data.share_prefixes and cfg.data.packing else None
    if dropout:
        reason = (f"dropout is on ({dropout}): a shared prefix would give every example that shares it one dropout "
                  "mask; without dropout it stays on")
        cfg = with_change(cfg, "data.share_prefixes", False, reason, changes)
        console.print(f"[bold]data[/bold] share_prefixes: off for this run, since {reason}")
    ctx = RunContext(virtual_tokens=method.virtual_tokens)
    # before prepare: a cached reference must be computed as the policy is
    console.print(f"[bold]speed[/bold] {checked_speed_options(model, cfg, device, pad_id, ctx, ranks)}")
    # the reference policy is the model before training: the token rows' switch goes with the method's
    note = objective.prepare(model, trainable_tokens.with_rows_off(method) if rows else method, cfg, data, device,
                             pad_id, ctx)
    trainable, total = count_parameters(model)
    ctx.memory_plan = predicted_peak(cfg, device.type, objective, data.train, pad_id)
    if ctx.memory_plan is not None:
        console.print(f"[bold]plan[/bold] {plan_line(ctx.memory_plan)}")
    console.print(f"[bold]method[/bold] {cfg.method.name}: {trainable:,} trainable of {total:,} parameters "
                  f"({100 * trainable / total:.3f} %)")
    if note:
        console.print(f"[bold]objective[/bold] {cfg.objective}: {note}")

    config_yaml, effective = dump_config(given), effective_yaml(changes)
    ranks.barrier()  # every rank has read what it needs from output_dir (a cached DPO reference) before it changes
    if ranks.main:
        if overwrite and run_dir.exists() and not resume:
            shutil.rmtree(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        objective.keep_in_run(run_dir)
        atomic_write_text(run_dir / "config.yaml", config_yaml)
        atomic_write_text(run_dir / EFFECTIVE_FILE, effective)
    report_yaml = config_yaml + (f"\n# {EFFECTIVE_FILE}\n{effective}" if changes else "")
    return Run(cfg, console, run_dir, device, tokenizer, data, model, method, objective, pad_id, trainable, total,
               report_yaml, ranks=ranks, forgetting=forgetting, ctx=ctx)


def general_perplexity(run: Run) -> float | None:
    """Perplexity on the forgetting corpus (report.forgetting), or None when that is off. Every rank computes it
    (under FSDP through the sharded model, all ranks together)."""
    if run.forgetting is None:
        return None
    from tunesmith.objectives import lm

    started = time.perf_counter()
    loss = evaluate(run.model, lm, run.forgetting.examples, run.cfg, run.device, run.pad_id, run.ctx,
                    run.ranks)["loss"]
    run.forgetting.seconds += time.perf_counter() - started
    return math.exp(loss)


def make_optimizer(run: Run, total_steps: int):
    """The optimizer over the method's parameter groups (one, or LoRA+'s: methods/base.py) and its schedule, which
    scales every group's own learning rate by the same factor."""
    cfg = run.cfg
    groups = parameter_groups(run.model, cfg.method, cfg.train.lr, cfg.train.weight_decay)
    params = [p for group in groups for p in group["params"]]
    if cfg.train.optimizer == "galore":
        from tunesmith.train.galore import GaloreAdamW, galore_groups

        optimizer = GaloreAdamW(galore_groups(run.model, groups, cfg.train.galore), lr=cfg.train.lr)
    else:
        # the fused kernel: one pass per tensor instead of one per operation (5x faster than foreach on 58 M CPU
        # params)
        fused = run.device.type in ("cpu", "cuda") and all(p.is_floating_point() for p in params)
        optimizer = torch.optim.AdamW(groups, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay,
                                      fused=True if fused else None,
                                      foreach=None if fused else run.device.type != "mps")
    scheduler = make_scheduler(optimizer, cfg.train.schedule, cfg.train.warmup_steps, total_steps)
    return params, optimizer, scheduler


def resume_position(run: Run, resume: bool, optimizer, scheduler) -> tuple[int, int]:
    """(step, data position) of the last checkpoint when resuming, else (0, 0)."""
    if not resume:
        return 0, 0
    last = list_checkpoints(run.run_dir)[-1]
    meta = load_checkpoint(last, run.model, optimizer, scheduler, run.ranks)
    run.console.print(f"[bold]resume[/bold] from {last.name} (step {meta['step']})")
    if meta["rng_note"]:
        run.console.print(f"[bold]resume[/bold] RNG: {meta['rng_note']}")
    return meta["step"], meta["data_position"]


def eval_row(metrics: dict) -> dict:
    return {f"eval/{key}": value for key, value in metrics.items()}


def finish_run(run: Run, total_steps: int, seconds: float, tokens_seen: int, baseline: dict, after: dict | None,
               extra_facts: dict | None = None, forgetting_after: float | None = None,
               mixture: dict | None = None, compiled: dict | None = None) -> RunResult:
    """Save the trained artifact, then summary, plot, report.md and summary.json (the main rank; the others only
    help gather the full weights)."""
    cfg, model, method = run.cfg, run.model, run.method
    run.ranks.consolidate(model)
    if not run.ranks.main:
        return RunResult(run.run_dir, total_steps, baseline["eval_loss"], after.get("loss") if after else None,
                         run.trainable, run.total, seconds, eval_metrics_before=baseline["eval_metrics"],
                         eval_metrics_after=after)
    run.objective.save(model, method, cfg, run.run_dir / cfg.method.declaration.artifact)
    if cfg.model.added_tokens or cfg.model.trainable_tokens:
        trainable_tokens.save_with_artifact(model, run.tokenizer, run.run_dir / cfg.method.declaration.artifact)
    after_loss = after.get("loss") if after else None
    result = RunResult(run.run_dir, total_steps, baseline["eval_loss"], after_loss, run.trainable, run.total, seconds)
    result.eval_metrics_before, result.eval_metrics_after = baseline["eval_metrics"], after
    result.summary = _summarize(cfg, run.data, result, tokens_seen, model, run.tokenizer, baseline, run.objective,
                                run.ctx)
    result.summary["facts"].update(extra_facts or {})
    if compiled and (compiled["compiled"] or compiled["setting"] == "auto"):
        result.summary["facts"]["compile"] = compiled["reason"] + (
            f"; {compiled['compile_seconds']:.1f} s of compiling" if "compile_seconds" in compiled else "")
    result.tasks = _task_results(run.data, mixture, baseline["eval_metrics"], after)
    if result.tasks:
        result.summary["tasks"] = result.tasks
    forgetting = None
    if run.forgetting is not None and forgetting_after is not None:
        before = baseline.get("forgetting_perplexity")
        result.summary["facts"].update(forgetting_facts(run.forgetting, before, forgetting_after))
        forgetting = {"corpus": run.forgetting.corpus, "tokens": run.forgetting.tokens, "perplexity_before": before,
                      "perplexity_after": forgetting_after, "seconds": run.forgetting.seconds}
    result.forgetting = forgetting
    if run.ranks.world > 1:
        result.summary["facts"]["steps"] += f" per rank × {run.ranks.world} ranks ({run.ranks.strategy})"
    plot_losses(run.run_dir)
    write_report(run.run_dir, result.summary, run.config_yaml)
    atomic_write_text(run.run_dir / "summary.json", json.dumps({
        "method": cfg.method.name, "objective": cfg.objective, "steps": total_steps, "trainable": run.trainable,
        "total": run.total, "eval_before": result.eval_before, "eval_after": after_loss, "train_seconds": seconds,
        "tokens": tokens_seen, "tokens_per_s": tokens_seen / max(seconds, 1e-9), "forgetting": forgetting,
        **({"tasks": result.tasks} if result.tasks else {}), **({"compile": compiled} if compiled else {})},
        indent=1))
    return result


def baseline(run: Run, resume: bool, held_out) -> dict:
    """The untrained model's held-out metrics (`held_out(run)`), general-text perplexity and sample generations, kept
    in the run folder so that a resumed run reports them."""
    path = run.run_dir / "baseline.json"
    if resume and path.is_file():
        kept = json.loads(path.read_text())
        if "eval_metrics" not in kept:  # written before the held-out loss alone was kept as eval_metrics too
            kept["eval_metrics"] = None if kept["eval_loss"] is None else {"loss": kept["eval_loss"]}
        return kept
    cfg = run.cfg
    out = {"eval_loss": None, "eval_metrics": None, "heldout_samples": [], "trained_samples": []}
    if cfg.report.compare:
        out["eval_metrics"] = held_out(run)
        out["eval_loss"] = (out["eval_metrics"] or {}).get("loss")
        if run.ranks.main:  # the report is the main rank's
            out["heldout_samples"] = sample_generations(run.model, run.tokenizer, run.data.eval_items,
                                                        cfg.report.heldout_samples, cfg.report.max_new_tokens,
                                                        run.ctx)
            out["trained_samples"] = sample_generations(run.model, run.tokenizer, run.data.train_items,
                                                        cfg.report.trained_samples, cfg.report.max_new_tokens,
                                                        run.ctx)
    out["forgetting_perplexity"] = general_perplexity(run)  # every rank takes part in the evaluation
    if run.ranks.main:
        atomic_write_text(path, json.dumps(out, indent=1))
    return out


def _task_results(data: Datasets, mixture: dict | None, before: dict | None, after: dict | None) -> dict | None:
    """Per task: its mixture weight, the share of the examples it supplied, its held-out loss before and after."""
    if not data.tasks:
        return None
    out = {}
    for task in data.tasks:
        key = f"{task.name}/loss"
        out[task.name] = {"train_examples": task.size, "weight": task.weight,
                          "sampled_share": (mixture or {}).get(task.name),
                          "eval_loss_before": (before or {}).get(key), "eval_loss_after": (after or {}).get(key)}
    return out


def _memory_line(model, trainable: int) -> str:
    weights = sum(p.numel() * p.element_size() for p in {id(p): p for p in model.parameters()}.values())
    grads_and_state = trainable * 4 * 3  # fp32 gradient + AdamW's two moments per trainable parameter
    return (f"weights {weights / 2**20:,.0f} MiB; gradients + AdamW state for {trainable:,} trainable parameters "
            f"{grads_and_state / 2**20:,.0f} MiB")


def _summarize(cfg, data, result: RunResult, tokens_seen, model, tokenizer, baseline: dict, objective,
               ctx: RunContext) -> dict:
    facts = {
        "model": cfg.model.path,
        "method": f"{cfg.method.name} ({result.trainable:,} trainable of {result.total:,} = "
                  f"{100 * result.trainable / result.total:.3f} %)",
        "objective": cfg.objective,
        "data": f"{data.format}; train {data.train_report.summary()}"
                + (f"; eval {len(data.eval)} examples" if data.eval else ""),
        "memory": _memory_line(model, result.trainable),
        "peak memory": predicted_vs_measured(ctx.memory_plan, model.device),
        "steps": f"{result.steps} × batch {cfg.train.batch_size} × accumulation {cfg.train.grad_accum}",
        "training time": f"{result.seconds:.1f} s ({tokens_seen / max(result.seconds, 1e-9):.0f} tokens/s)",
    }
    summary = {"facts": facts, "before_after": {}}
    before, after = result.eval_metrics_before, result.eval_metrics_after
    if before is not None and after is not None:
        for name, (b, a) in objective.compare(before, after).items():
            if b:
                summary["before_after"][name] = (b, a)
            else:  # a change relative to zero has no percentage; such a metric goes with the facts
                facts[name] = f"{b:.4f} before, {a:.4f} after"
    for key, items in (("heldout_samples", data.eval_items), ("trained_samples", data.train_items)):
        before = baseline[key]
        after = sample_generations(model, tokenizer, items, len(before), cfg.report.max_new_tokens, ctx) \
            if before else []
        summary[key] = [{"prompt": b["prompt"], "reference": b["reference"], "before": b["output"],
                         "after": a["output"]} for b, a in zip(before, after)]
    return summary
