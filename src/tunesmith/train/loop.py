"""The one training loop: every method and objective goes through it; it never branches on their names.

An objective's algorithm (train/algorithm.py) supplies each step: the supervised step here (accumulate the
micro-batches' gradients, clip, one optimizer step), PPO's rollout step (train/ppo_step.py), GRPO's generation step
(train/grpo_step.py). Around it the loop does the same for all of them: the schedule, resume, step-0 and final
evaluation, periodic evaluation and checkpoints, the forgetting probe, metrics.jsonl, the ranks of a torchrun job
and the saved artifact with its report.
"""

from __future__ import annotations

import importlib
import math
import time
from dataclasses import dataclass, field

from tunesmith.config import RunConfig
from tunesmith.context import RunContext
from tunesmith.devices import autocast_for, to_device
from tunesmith.faults import fault_after
from tunesmith.objectives import objective_of
from tunesmith.train.algorithm import Algorithm, apply_update
from tunesmith.train.checkpoint import save_checkpoint
from tunesmith.train.compile_schedule import CompileSchedule
from tunesmith.train.distributed import OneProcess, refuse_under_torchrun
from tunesmith.train.logging import metrics_logger
from tunesmith.train.run import (Run, RunResult, baseline, eval_row, evaluate_data, finish_run, general_perplexity,
                                 make_optimizer, open_run, resume_position)

__all__ = ["RunResult", "accumulate_gradients", "train"]

# The algorithms an objective may name as its `own_loop` (objectives never import the training loop); None: the
# supervised step.
ALGORITHMS = {"ppo": "tunesmith.train.ppo_step:algorithm", "grpo": "tunesmith.train.grpo_step:algorithm"}


@dataclass
class StepTotals:
    loss: float = 0.0
    units: int = 0
    label_tokens: int = 0
    tokens: int = 0
    metrics: dict = field(default_factory=dict)


def accumulate_gradients(model, objective, micro: list[list], cfg: RunConfig, device, pad_id: int,
                         ctx: RunContext, ranks=None) -> StepTotals:
    """Backward over the micro-batches of one optimizer step, normalised by all their units (label tokens, pairs)
    together, on all ranks together, so that accumulating k micro-batches on W ranks gives the gradient of the one
    big batch on one process. The totals returned are the sums over the ranks."""
    ranks = ranks or OneProcess()
    local = StepTotals(units=sum(objective.units(ex) for mb in micro for ex in mb),
                       label_tokens=sum(ex.n_labels for mb in micro for ex in mb),
                       tokens=sum(len(ex) for mb in micro for ex in mb))
    units = int(ranks.sum([local.units])[0])
    # DDP and FSDP average the ranks' gradients; scaled by the world size, the average is the sum over all units
    per_unit = units / ranks.world
    for k, mb in enumerate(micro):
        batch = to_device(objective.collate(mb, cfg, pad_id), device)
        with ranks.gradient_sync(last=k == len(micro) - 1):
            with autocast_for(cfg, device):
                loss, _, metrics = ranks.loss_sum(model, objective, batch, ctx)
            (loss / per_unit).backward()
        local.loss += float(loss.detach())
        for key, value in metrics.items():
            local.metrics[key] = local.metrics.get(key, 0.0) + value
    keys = list(local.metrics)  # the same on every rank
    summed = ranks.sum([local.loss, local.label_tokens, local.tokens, *(local.metrics[k] for k in keys)])
    return StepTotals(summed[0], units, int(summed[1]), int(summed[2]), dict(zip(keys, summed[3:])))


def supervised_step(run: Run, micro: list[list], params, optimizer, scheduler) -> tuple[dict, int]:
    """One optimizer step over `micro`: the gradients accumulated, clipped, applied."""
    cfg = run.cfg
    t0 = time.perf_counter()
    totals = accumulate_gradients(run.model, run.objective, micro, cfg, run.device, run.pad_id, run.ctx, run.ranks)
    lr, grad_norm = apply_update(run, params, optimizer, scheduler)
    row = {"loss": totals.loss / totals.units, "lr": lr, "tokens": totals.tokens,
           "label_tokens": totals.label_tokens, "tokens_per_s": totals.tokens / (time.perf_counter() - t0)}
    row.update({key: value / totals.units for key, value in totals.metrics.items()})
    if grad_norm is not None:
        row["grad_norm"] = grad_norm
    return row, totals.tokens


def held_out_loss(run: Run) -> dict | None:
    return evaluate_data(run.model, run.objective, run.data, run.cfg, run.device, run.pad_id, run.ctx, run.ranks)


SUPERVISED = Algorithm(supervised_step, held_out_loss)


def algorithm_for(cfg: RunConfig, objective) -> Algorithm:
    if objective.own_loop is None:
        return SUPERVISED
    module, _, function = ALGORITHMS[objective.own_loop].partition(":")
    return getattr(importlib.import_module(module), function)(cfg, objective)


def train(cfg: RunConfig, overwrite: bool = False, resume: bool = False, quiet: bool = False) -> RunResult:
    """Train `cfg`'s method with its objective, each step the objective's algorithm's."""
    refuse_under_torchrun(cfg)
    objective = objective_of(cfg)
    algorithm = algorithm_for(cfg, objective)
    run = open_run(cfg, objective, overwrite, resume, quiet)
    cfg = run.cfg  # the effective settings (config/effective.py); the given cfg stays as it was
    model, data, ranks = run.model, run.data, run.ranks
    ranks.wrap(model, objective)  # before the optimizer: FSDP replaces the parameters by their shards
    per_step = cfg.train.batch_size * cfg.train.grad_accum * ranks.world
    total_steps = cfg.train.max_steps or max(1, math.ceil(cfg.train.epochs * len(data.train) / per_step))
    params, optimizer, scheduler = make_optimizer(run, total_steps * algorithm.updates_per_step)
    start_step, position = resume_position(run, resume, optimizer, scheduler)
    model.train(algorithm.train_mode)
    before = baseline(run, resume, algorithm.held_out)
    if before["eval_metrics"]:
        run.console.print(f"[bold]eval[/bold] {algorithm.headline_label} before training: "
                          f"{before['eval_metrics'][algorithm.headline]:.4f}")

    stream = data.stream(cfg.train.seed, position)
    compiling = CompileSchedule(run, total_steps, start_step, objective.own_loop)
    started = time.perf_counter()
    tokens_seen = 0
    with metrics_logger(ranks.main, run.run_dir, total_steps, start_step, run.console, quiet) as log:
        if start_step == 0 and before["eval_metrics"]:
            log.log({"step": 0, **eval_row(before["eval_metrics"])})
        if start_step == 0 and before["forgetting_perplexity"] is not None:
            log.log({"step": 0, "forgetting/perplexity": before["forgetting_perplexity"]})
        for step in range(start_step + 1, total_steps + 1):
            micro = [[data.train[i] for i in ranks.shard(stream.take(cfg.train.batch_size * ranks.world))]
                     for _ in range(cfg.train.grad_accum)]
            log.compiling(compiling.compiling(step))
            step_started = time.perf_counter()
            row, tokens = algorithm.step(run, micro, params, optimizer, scheduler)
            compiling.after_step(step, tokens, time.perf_counter() - step_started, log.note)
            tokens_seen += tokens
            if step % cfg.train.log_every == 0 or step == total_steps:
                log.log({"step": step, **row, "elapsed_s": time.perf_counter() - started})
            if cfg.train.eval_every and step % cfg.train.eval_every == 0 and step != total_steps:
                ev = algorithm.held_out(run)
                if ev is not None:
                    log.log({"step": step, **eval_row(ev)})
                    log.note(f"step {step}: {algorithm.headline_label} {ev[algorithm.headline]:.4f}")
            if cfg.train.save_every and step % cfg.train.save_every == 0 and step != total_steps:
                save_checkpoint(run.run_dir, step, model, optimizer, scheduler, stream.position,
                                cfg.train.keep_checkpoints, ranks)
            fault_after(step)
        after = algorithm.held_out(run)
        if after is not None:
            log.log({"step": total_steps, **eval_row(after)})
        forgot = general_perplexity(run)
        if forgot is not None:
            log.log({"step": total_steps, "forgetting/perplexity": forgot})
        mixture = data.sampled_mixture(stream)
        if mixture:
            log.log({"step": total_steps, **{f"mixture/{name}": share for name, share in mixture.items()}})
    seconds = time.perf_counter() - started
    return finish_run(run, total_steps, seconds, tokens_seen, before, after, forgetting_after=forgot,
                      mixture=mixture, compiled=compiling.finish())
