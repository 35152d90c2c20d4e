"""The one training loop: every method and objective goes through it; it never branches on their names."""

from __future__ import annotations

import json
import math
import random
import shutil
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from rich.console import Console

from tunesmith.config import RunConfig, dump_config
from tunesmith.data.packing import collate
from tunesmith.data.pipeline import Datasets, build_datasets, prompt_and_answer
from tunesmith.data.templates import Tokenized
from tunesmith.errors import OutputDirError
from tunesmith.methods import get_method
from tunesmith.methods.base import count_parameters
from tunesmith.objectives import get_objective
from tunesmith.train.checkpoint import atomic_write_text, list_checkpoints, load_checkpoint, save_checkpoint
from tunesmith.train.logging import MetricsLogger
from tunesmith.train.report import plot_losses, write_report


class SimulatedCrash(BaseException):
    """Raised by tests to stop a run abruptly after a given step (after that step's checkpoint, if any)."""


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


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def pick_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("cpu")
    return torch.device(name)


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


class ExampleStream:
    """An endless, seeded stream of example indices, one fresh permutation per epoch; its position is resumable."""

    def __init__(self, n: int, seed: int, position: int = 0):
        self.n, self.seed, self.position = n, seed, position

    def _order(self, epoch: int) -> list[int]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(self.n, generator=g).tolist()

    def take(self, k: int) -> list[int]:
        out = []
        while len(out) < k:
            epoch, offset = divmod(self.position, self.n)
            order = self._order(epoch)
            grab = order[offset : offset + k - len(out)]
            out.extend(grab)
            self.position += len(grab)
        return out


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


def to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def autocast_for(cfg: RunConfig, device: torch.device):
    if cfg.train.bf16:
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return nullcontext()


@torch.no_grad()
def evaluate(model, objective, examples: list[Tokenized], cfg: RunConfig, device, pad_id: int) -> float | None:
    if not examples:
        return None
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    bs = cfg.train.batch_size
    for i in range(0, len(examples), bs):
        batch = to_device(collate(examples[i : i + bs], cfg.data.packing, cfg.data.max_length, pad_id), device)
        with autocast_for(cfg, device):
            loss, n, _ = objective.loss_sum(model, batch)
        total += float(loss)
        count += n
    if was_training:
        model.train()
    return total / max(count, 1)


def sample_generations(model, tokenizer, items: list, n: int, max_new_tokens: int) -> list[dict]:
    from tunesmith.infer.generate import generate_chat

    out = []
    for item in items[:n]:
        split = prompt_and_answer(item)
        if split is None:
            break
        prompt, reference = split
        out.append({"prompt": prompt[-1]["content"], "reference": reference,
                    "output": generate_chat(model, tokenizer, prompt, max_new_tokens)})
    return out


def accumulate_gradients(model, objective, micro: list[list[Tokenized]], cfg: RunConfig, device, pad_id: int):
    """Backward over the micro-batches of one optimizer step, normalised by all their label tokens together,
    so that accumulating k micro-batches gives the gradient of the one big batch."""
    n_labels = sum(ex.n_labels for mb in micro for ex in mb)
    n_tokens = sum(len(ex) for mb in micro for ex in mb)
    loss_total = 0.0
    for mb in micro:
        batch = to_device(collate(mb, cfg.data.packing, cfg.data.max_length, pad_id), device)
        with autocast_for(cfg, device):
            loss, _, _ = objective.loss_sum(model, batch)
        (loss / n_labels).backward()
        loss_total += float(loss.detach())
    return loss_total, n_labels, n_tokens


def train(cfg: RunConfig, overwrite: bool = False, resume: bool = False, quiet: bool = False,
          crash_after_step: int | None = None) -> RunResult:
    from tunesmith.models import load_model, load_tokenizer

    console = Console(stderr=True, quiet=quiet)
    run_dir = Path(cfg.output_dir)
    prepare_run_dir(run_dir, overwrite, resume)
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    seed_everything(cfg.train.seed)
    device = pick_device(cfg.train.device)

    tokenizer = load_tokenizer(cfg.model.path, cfg.model.trust_remote_code)
    data: Datasets = build_datasets(cfg, tokenizer)
    console.print(f"[bold]data[/bold] train: {data.train_report.summary()}")
    if data.eval_report:
        console.print(f"[bold]data[/bold] eval: {data.eval_report.summary()}")
    model = load_model(cfg.model.path, cfg.model.dtype, cfg.model.trust_remote_code)
    method = get_method(cfg.method.name)
    method.apply(model, cfg.method)
    model.to(device)
    objective = get_objective(cfg.objective)
    trainable, total = count_parameters(model)
    console.print(f"[bold]method[/bold] {cfg.method.name}: {trainable:,} trainable of {total:,} parameters "
                  f"({100 * trainable / total:.3f} %)")

    if overwrite and run_dir.exists() and not resume:
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    config_yaml = dump_config(cfg)
    atomic_write_text(run_dir / "config.yaml", config_yaml)

    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    per_step = cfg.train.batch_size * cfg.train.grad_accum
    total_steps = cfg.train.max_steps or max(1, math.ceil(cfg.train.epochs * len(data.train) / per_step))
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay,
                                  foreach=device.type != "mps")
    scheduler = make_scheduler(optimizer, cfg.train.schedule, cfg.train.warmup_steps, total_steps)

    start_step, position = 0, 0
    if resume:
        last = list_checkpoints(run_dir)[-1]
        meta = load_checkpoint(last, model, optimizer, scheduler)
        start_step, position = meta["step"], meta["data_position"]
        console.print(f"[bold]resume[/bold] from {last.name} (step {start_step})")

    baseline = _baseline(run_dir, resume, cfg, model, objective, data, tokenizer, device, pad_id)
    if baseline["eval_loss"] is not None:
        console.print(f"[bold]eval[/bold] held-out loss before training: {baseline['eval_loss']:.4f}")

    stream = ExampleStream(len(data.train), cfg.train.seed, position)
    model.train()
    started = time.perf_counter()
    tokens_seen = 0
    with MetricsLogger(run_dir, total_steps, start_step, console, quiet) as log:
        if start_step == 0 and baseline["eval_loss"] is not None:
            log.log({"step": 0, "eval/loss": baseline["eval_loss"]})
        for step in range(start_step + 1, total_steps + 1):
            t0 = time.perf_counter()
            micro = [[data.train[i] for i in stream.take(cfg.train.batch_size)] for _ in range(cfg.train.grad_accum)]
            step_loss, n_labels, n_tokens = accumulate_gradients(model, objective, micro, cfg, device, pad_id)
            grad_norm = None
            if cfg.train.max_grad_norm:
                grad_norm = float(torch.nn.utils.clip_grad_norm_(params, cfg.train.max_grad_norm))
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            dt = time.perf_counter() - t0
            tokens_seen += n_tokens
            row = {"step": step, "loss": step_loss / n_labels, "lr": scheduler.get_last_lr()[0],
                   "tokens": n_tokens, "label_tokens": n_labels, "tokens_per_s": n_tokens / dt,
                   "elapsed_s": time.perf_counter() - started}
            if grad_norm is not None:
                row["grad_norm"] = grad_norm
            if step % cfg.train.log_every == 0 or step == total_steps:
                log.log(row)
            if cfg.train.eval_every and step % cfg.train.eval_every == 0 and step != total_steps:
                ev = evaluate(model, objective, data.eval, cfg, device, pad_id)
                if ev is not None:
                    log.log({"step": step, "eval/loss": ev})
                    log.note(f"step {step}: held-out loss {ev:.4f}")
            if cfg.train.save_every and step % cfg.train.save_every == 0 and step != total_steps:
                save_checkpoint(run_dir, step, model, optimizer, scheduler, stream.position, cfg.train.keep_checkpoints)
            if crash_after_step is not None and step == crash_after_step:
                raise SimulatedCrash(step)
        after_loss = evaluate(model, objective, data.eval, cfg, device, pad_id)
        if after_loss is not None:
            log.log({"step": total_steps, "eval/loss": after_loss})
    seconds = time.perf_counter() - started

    method.save(model, cfg.method, run_dir / getattr(method, "OUTPUT_NAME", "adapter"), cfg.model.path)
    result = RunResult(run_dir, total_steps, baseline["eval_loss"], after_loss, trainable, total, seconds)
    result.summary = _summarize(cfg, data, result, tokens_seen, model, tokenizer, baseline)
    plot_losses(run_dir)
    write_report(run_dir, result.summary, config_yaml)
    atomic_write_text(run_dir / "summary.json", json.dumps({
        "method": cfg.method.name, "objective": cfg.objective, "steps": total_steps, "trainable": trainable,
        "total": total, "eval_before": result.eval_before, "eval_after": after_loss, "train_seconds": seconds,
        "tokens": tokens_seen, "tokens_per_s": tokens_seen / max(seconds, 1e-9)}, indent=1))
    return result


def _baseline(run_dir: Path, resume: bool, cfg, model, objective, data, tokenizer, device, pad_id) -> dict:
    """Held-out loss and sample generations of the untouched model, kept in the run so a resumed run reports them."""
    path = run_dir / "baseline.json"
    if resume and path.is_file():
        return json.loads(path.read_text())
    baseline = {"eval_loss": None, "heldout_samples": [], "trained_samples": []}
    if cfg.report.compare:
        baseline["eval_loss"] = evaluate(model, objective, data.eval, cfg, device, pad_id)
        baseline["heldout_samples"] = sample_generations(model, tokenizer, data.eval_items,
                                                         cfg.report.heldout_samples, cfg.report.max_new_tokens)
        baseline["trained_samples"] = sample_generations(model, tokenizer, data.train_items,
                                                         cfg.report.trained_samples, cfg.report.max_new_tokens)
    atomic_write_text(path, json.dumps(baseline, indent=1))
    return baseline


def _memory_line(model, trainable: int) -> str:
    weights = sum(p.numel() * p.element_size() for p in {id(p): p for p in model.parameters()}.values())
    grads_and_state = trainable * 4 * 3  # fp32 gradient + AdamW's two moments per trainable parameter
    return (f"weights {weights / 2**20:,.0f} MiB; gradients + AdamW state for {trainable:,} trainable parameters "
            f"{grads_and_state / 2**20:,.0f} MiB")


def _summarize(cfg, data, result: RunResult, tokens_seen, model, tokenizer, baseline: dict) -> dict:
    facts = {
        "model": cfg.model.path,
        "method": f"{cfg.method.name} ({result.trainable:,} trainable of {result.total:,} = "
                  f"{100 * result.trainable / result.total:.3f} %)",
        "objective": cfg.objective,
        "data": f"{data.format}; train {data.train_report.summary()}"
                + (f"; eval {len(data.eval)} examples" if data.eval else ""),
        "memory": _memory_line(model, result.trainable),
        "steps": f"{result.steps} × batch {cfg.train.batch_size} × accumulation {cfg.train.grad_accum}",
        "training time": f"{result.seconds:.1f} s ({tokens_seen / max(result.seconds, 1e-9):.0f} tokens/s)",
    }
    summary = {"facts": facts, "before_after": {}}
    if result.eval_before is not None and result.eval_after is not None:
        summary["before_after"]["held-out loss"] = (result.eval_before, result.eval_after)
        summary["before_after"]["held-out perplexity"] = (math.exp(result.eval_before), math.exp(result.eval_after))
    for key, items in (("heldout_samples", data.eval_items), ("trained_samples", data.train_items)):
        before = baseline[key]
        after = sample_generations(model, tokenizer, items, len(before), cfg.report.max_new_tokens) if before else []
        summary[key] = [{"prompt": b["prompt"], "reference": b["reference"], "before": b["output"],
                         "after": a["output"]} for b, a in zip(before, after)]
    return summary
