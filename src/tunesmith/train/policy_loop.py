"""The outer loop PPO and GRPO share: per step, a batch of train.batch_size prompts goes to the algorithm's own step
(sample, score, update); around it the same run set-up, optimizer and schedule, resume, the untrained policy's
held-out metrics and general-text perplexity, periodic evaluation and checkpoints, and the saved artifact with its
report.

The model stays in eval mode throughout (no dropout), so a step's sampling log-probs and its first update's agree
exactly; a checkpoint holds the weights, optimizer, schedule, RNG and prompt position, which is all a step depends
on, so a resumed run ends with the weights of an uninterrupted one.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from typing import Callable

import torch

from tunesmith.atomic import atomic_write_text
from tunesmith.data.mixture import ExampleStream
from tunesmith.data.pair_batches import collate_sequences
from tunesmith.devices import to_device
from tunesmith.faults import fault_after
from tunesmith.train.checkpoint import save_checkpoint
from tunesmith.train.logging import MetricsLogger
from tunesmith.train.run import (Run, RunResult, eval_row, finish_run, general_perplexity,
                                 make_optimizer, open_run, resume_position, sample_generations)


@dataclass
class PolicyAlgorithm:
    updates_per_step: int  # optimizer steps per loop step: what the schedule counts
    step: Callable  # (run, prompts, params, optimizer, scheduler) -> (the step's metrics row, its tokens)
    held_out: Callable  # (run, prompts) -> {"reward": ..., ...} of greedy answers, or None without prompts


def collated(run: Run, seqs: list) -> dict[str, torch.Tensor]:
    """Prompt + completion sequences as one batch on the run's device, packed or padded as data.packing says."""
    return to_device(collate_sequences(seqs, run.cfg.data.packing, run.cfg.data.max_length, run.pad_id,
                                       run.cfg.data.share_prefixes), run.device)


def baseline_with(run: Run, resume: bool, held_out) -> dict:
    """The untrained policy's held-out metrics, general-text perplexity and sample generations, kept in the run
    folder so that a resumed run reports them."""
    path = run.run_dir / "baseline.json"
    if resume and path.is_file():
        return json.loads(path.read_text())
    cfg = run.cfg
    baseline = {"eval_loss": None, "eval_metrics": None, "heldout_samples": [], "trained_samples": [],
                "forgetting_perplexity": general_perplexity(run)}
    if cfg.report.compare:
        baseline["eval_metrics"] = held_out(run, run.data.eval)
        baseline["heldout_samples"] = sample_generations(run.model, run.tokenizer, run.data.eval_items,
                                                         cfg.report.heldout_samples, cfg.report.max_new_tokens)
        baseline["trained_samples"] = sample_generations(run.model, run.tokenizer, run.data.train_items,
                                                         cfg.report.trained_samples, cfg.report.max_new_tokens)
    atomic_write_text(path, json.dumps(baseline, indent=1))
    return baseline


def train_policy(cfg, objective, algorithm: PolicyAlgorithm, overwrite: bool = False, resume: bool = False,
                 quiet: bool = False) -> RunResult:
    run = open_run(cfg, objective, overwrite, resume, quiet)
    total_steps = cfg.train.max_steps or max(1, math.ceil(cfg.train.epochs * len(run.data.train)
                                                           / cfg.train.batch_size))
    params, optimizer, scheduler = make_optimizer(run, total_steps * algorithm.updates_per_step)
    start_step, position = resume_position(run, resume, optimizer, scheduler)
    run.model.eval()
    baseline = baseline_with(run, resume, algorithm.held_out)
    if baseline["eval_metrics"]:
        run.console.print(f"[bold]eval[/bold] held-out mean reward before training: "
                          f"{baseline['eval_metrics']['reward']:.4f}")

    stream = ExampleStream(len(run.data.train), cfg.train.seed, position)
    started = time.perf_counter()
    tokens_seen = 0
    with MetricsLogger(run.run_dir, total_steps, start_step, run.console, quiet) as log:
        if start_step == 0 and baseline["eval_metrics"]:
            log.log({"step": 0, **eval_row(baseline["eval_metrics"])})
        if start_step == 0 and baseline.get("forgetting_perplexity") is not None:
            log.log({"step": 0, "forgetting/perplexity": baseline["forgetting_perplexity"]})
        for step in range(start_step + 1, total_steps + 1):
            prompts = [run.data.train[i] for i in stream.take(cfg.train.batch_size)]
            metrics, tokens = algorithm.step(run, prompts, params, optimizer, scheduler)
            tokens_seen += tokens
            if step % cfg.train.log_every == 0 or step == total_steps:
                log.log({"step": step, **metrics, "elapsed_s": time.perf_counter() - started})
            if cfg.train.eval_every and step % cfg.train.eval_every == 0 and step != total_steps:
                ev = algorithm.held_out(run, run.data.eval)
                if ev is not None:
                    log.log({"step": step, **eval_row(ev)})
                    log.note(f"step {step}: held-out mean reward {ev['reward']:.4f}")
            if cfg.train.save_every and step % cfg.train.save_every == 0 and step != total_steps:
                save_checkpoint(run.run_dir, step, run.model, optimizer, scheduler, stream.position,
                                cfg.train.keep_checkpoints)
            fault_after(step)
        after = algorithm.held_out(run, run.data.eval)
        if after is not None:
            log.log({"step": total_steps, **eval_row(after)})
        forgot = general_perplexity(run)
        if forgot is not None:
            log.log({"step": total_steps, "forgetting/perplexity": forgot})
    seconds = time.perf_counter() - started
    return finish_run(run, total_steps, seconds, tokens_seen, baseline, after, forgetting_after=forgot)
