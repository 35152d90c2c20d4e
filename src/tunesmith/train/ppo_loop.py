"""PPO's outer loop: per step, a rollout (sample, score, reference, values, advantages), then minibatch epochs.

It reuses the training loop's pieces: run setup (data, model, method, run dir), optimizer and schedule, resumable
checkpoints and prompt stream, metrics.jsonl/TensorBoard/progress bar, report and summary. Dropout stays off
throughout (the model is in eval mode), so the rollout's log-probs and the first update's agree exactly.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass

import torch

from tunesmith.atomic import atomic_write_text
from tunesmith.config import RunConfig
from tunesmith.data.mixture import ExampleStream
from tunesmith.data.pair_batches import collate_sequences
from tunesmith.devices import autocast_for, to_device
from tunesmith.objectives.ppo import gae, masked_mean, policy_loss, sample, score_tokens, sequences, value_loss, whiten
from tunesmith.train.checkpoint import save_checkpoint
from tunesmith.train.logging import MetricsLogger
from tunesmith.train.run import (Run, RunResult, SimulatedCrash, finish_run, make_optimizer, open_run,
                                 resume_position, sample_generations)


@dataclass
class Rollout:
    prompts: list
    seqs: list
    width: int
    mask: torch.Tensor
    logps: torch.Tensor
    values: torch.Tensor
    advantages: torch.Tensor
    returns: torch.Tensor
    stats: dict


def _batch(run: Run, seqs: list) -> dict[str, torch.Tensor]:
    return to_device(collate_sequences(seqs, run.cfg.data.packing, run.cfg.data.max_length, run.pad_id,
                                       run.cfg.data.share_prefixes), run.device)


@torch.no_grad()
def rollout(run: Run, prompts: list) -> Rollout:
    cfg, model, objective = run.cfg, run.model, run.objective
    s = objective.settings
    with autocast_for(cfg, run.device):
        completions = sample(model, run.tokenizer, prompts, s)
    scores = objective.rewards(run.tokenizer, prompts, completions)
    seqs = sequences(prompts, completions)
    width = max(len(c) for c in completions)
    lengths = torch.tensor([len(c) for c in completions])
    mask = (torch.arange(width)[None, :] < lengths[:, None]).float().to(run.device)
    batch = _batch(run, seqs)
    with autocast_for(cfg, run.device):
        policy = score_tokens(model, batch, width, values=True, entropy=True)
        with objective.reference(model):
            reference = score_tokens(model, batch, width, values=False)
    kl = (policy["logps"] - reference["logps"]) * mask
    rewards = -s.kl_coef * kl
    last = (torch.arange(len(seqs)), lengths - 1)
    rewards[tuple(i.to(rewards.device) for i in last)] += scores.to(rewards.device)
    advantages, returns = gae(rewards, policy["values"], mask, s.gamma, s.lam)
    if s.whiten_advantages:
        advantages = whiten(advantages, mask)
    ended = [bool(c) and c[-1] == run.tokenizer.eos_token_id for c in completions]
    stats = {"reward": float(scores.mean()), "kl": float(kl.sum(1).mean()),
             "entropy": float(masked_mean(policy["entropy"], mask)), "completion_tokens": float(lengths.float().mean()),
             "ended": sum(ended) / len(ended)}
    return Rollout(prompts, seqs, width, mask, policy["logps"], policy["values"], advantages, returns, stats)


def optimize(run: Run, ro: Rollout, params, optimizer, scheduler) -> dict:
    """ppo.epochs passes over the rollout in shuffled minibatches, one optimizer step each."""
    cfg, s = run.cfg, run.objective.settings
    sums = {"policy_loss": 0.0, "value_loss": 0.0, "clip_fraction": 0.0, "approx_kl": 0.0}
    updates = 0
    for _ in range(s.epochs):
        order = torch.randperm(len(ro.seqs))
        for start in range(0, len(order), s.minibatch_size):
            chosen = order[start : start + s.minibatch_size]
            batch = _batch(run, [ro.seqs[i] for i in chosen.tolist()])
            idx = chosen.to(run.device)
            mask, old_logps = ro.mask[idx], ro.logps[idx]
            with autocast_for(cfg, run.device):
                new = score_tokens(run.model, batch, ro.width, values=True)
            pg, clip_fraction = policy_loss(new["logps"], old_logps, ro.advantages[idx], mask, s.clip_range)
            vf = value_loss(new["values"], ro.values[idx], ro.returns[idx], mask, s.value_clip_range)
            (pg + s.value_coef * vf).backward()
            if cfg.train.max_grad_norm:
                torch.nn.utils.clip_grad_norm_(params, cfg.train.max_grad_norm)
            lr = scheduler.get_last_lr()[0]  # the rate this update applies
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            updates += 1
            sums["policy_loss"] += float(pg.detach())
            sums["value_loss"] += float(vf.detach())
            sums["clip_fraction"] += float(clip_fraction)
            sums["approx_kl"] += float(masked_mean(old_logps - new["logps"].detach(), mask))
    return {**{k: v / updates for k, v in sums.items()}, "lr": lr}


@torch.no_grad()
def mean_reward(run: Run, prompts: list) -> float | None:
    """Mean score of greedy answers to the held-out prompts (deterministic, so before/after compare)."""
    if not prompts:
        return None
    total = 0.0
    bs = run.cfg.train.batch_size
    for i in range(0, len(prompts), bs):
        chunk = prompts[i : i + bs]
        with autocast_for(run.cfg, run.device):
            completions = sample(run.model, run.tokenizer, chunk, run.objective.settings, greedy=True)
        total += float(run.objective.rewards(run.tokenizer, chunk, completions).sum())
    return total / len(prompts)


def _held_out_reward(run: Run, prompts: list) -> dict | None:
    reward = mean_reward(run, prompts)
    return None if reward is None else {"reward": reward}


def baseline_with(run: Run, resume: bool, held_out) -> dict:
    """The untrained policy's held-out metrics (`held_out(run, prompts) -> dict | None`) and sample generations, kept
    in the run folder so that a resumed run reports them."""
    path = run.run_dir / "baseline.json"
    if resume and path.is_file():
        return json.loads(path.read_text())
    cfg = run.cfg
    baseline = {"eval_loss": None, "eval_metrics": None, "heldout_samples": [], "trained_samples": []}
    if cfg.report.compare:
        baseline["eval_metrics"] = held_out(run, run.data.eval)
        baseline["heldout_samples"] = sample_generations(run.model, run.tokenizer, run.data.eval_items,
                                                         cfg.report.heldout_samples, cfg.report.max_new_tokens)
        baseline["trained_samples"] = sample_generations(run.model, run.tokenizer, run.data.train_items,
                                                         cfg.report.trained_samples, cfg.report.max_new_tokens)
    atomic_write_text(path, json.dumps(baseline, indent=1))
    return baseline


def train_ppo(cfg: RunConfig, objective, overwrite: bool = False, resume: bool = False, quiet: bool = False,
              crash_after_step: int | None = None) -> RunResult:
    run = open_run(cfg, objective, overwrite, resume, quiet)
    s = objective.settings
    total_steps = cfg.train.max_steps or max(1, math.ceil(cfg.train.epochs * len(run.data.train)
                                                           / cfg.train.batch_size))
    updates_per_step = s.epochs * math.ceil(cfg.train.batch_size / s.minibatch_size)
    params, optimizer, scheduler = make_optimizer(run, total_steps * updates_per_step)
    start_step, position = resume_position(run, resume, optimizer, scheduler)
    run.model.eval()
    baseline = baseline_with(run, resume, _held_out_reward)
    if baseline["eval_metrics"]:
        run.console.print(f"[bold]eval[/bold] held-out mean reward before training: "
                          f"{baseline['eval_metrics']['reward']:.4f}")

    stream = ExampleStream(len(run.data.train), cfg.train.seed, position)
    started = time.perf_counter()
    tokens_seen = 0
    after = None
    with MetricsLogger(run.run_dir, total_steps, start_step, run.console, quiet) as log:
        if start_step == 0 and baseline["eval_metrics"]:
            log.log({"step": 0, "eval/reward": baseline["eval_metrics"]["reward"]})
        for step in range(start_step + 1, total_steps + 1):
            t0 = time.perf_counter()
            ro = rollout(run, [run.data.train[i] for i in stream.take(cfg.train.batch_size)])
            losses = optimize(run, ro, params, optimizer, scheduler)
            tokens = sum(len(x) for x in ro.seqs)
            tokens_seen += tokens
            dt = time.perf_counter() - t0
            row = {"step": step, "loss": losses["policy_loss"] + s.value_coef * losses["value_loss"], **ro.stats,
                   **losses, "tokens": tokens, "tokens_per_s": tokens / dt,
                   "elapsed_s": time.perf_counter() - started}
            if step % cfg.train.log_every == 0 or step == total_steps:
                log.log(row)
            if cfg.train.eval_every and step % cfg.train.eval_every == 0 and step != total_steps:
                reward = mean_reward(run, run.data.eval)
                if reward is not None:
                    log.log({"step": step, "eval/reward": reward})
                    log.note(f"step {step}: held-out mean reward {reward:.4f}")
            if cfg.train.save_every and step % cfg.train.save_every == 0 and step != total_steps:
                save_checkpoint(run.run_dir, step, run.model, optimizer, scheduler, stream.position,
                                cfg.train.keep_checkpoints)
            if crash_after_step is not None and step == crash_after_step:
                raise SimulatedCrash(step)
        reward = mean_reward(run, run.data.eval)
        if reward is not None:
            after = {"reward": reward}
            log.log({"step": total_steps, "eval/reward": reward})
    seconds = time.perf_counter() - started
    return finish_run(run, total_steps, seconds, tokens_seen, baseline, after)
