"""PPO's step: a rollout (sample, score, reference, values, advantages), then minibatch epochs. The loop around it
(set-up, resume, evaluation, checkpoints, report) is the one every objective trains in, train/loop.py.

The model stays in eval mode throughout (no dropout), so a step's sampling log-probs and its first update's agree
exactly; a checkpoint holds the weights, optimizer, schedule, RNG and prompt position, which is all a step depends
on, so a resumed run ends with the weights of an uninterrupted one.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch

from tunesmith.config import RunConfig
from tunesmith.data.pair_batches import collate_sequences
from tunesmith.devices import autocast_for, to_device
from tunesmith.objectives.ppo import gae, masked_mean, policy_loss, sample, score_tokens, sequences, value_loss, whiten
from tunesmith.train.algorithm import Algorithm, apply_update
from tunesmith.train.run import Run


def collated(run: Run, seqs: list) -> dict[str, torch.Tensor]:
    """Prompt + completion sequences as one batch on the run's device, packed or padded as data.packing says."""
    return to_device(collate_sequences(seqs, run.cfg.data.packing, run.cfg.data.max_length, run.pad_id,
                                       run.cfg.data.share_prefixes), run.device)


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


@torch.no_grad()
def rollout(run: Run, prompts: list) -> Rollout:
    cfg, model, objective = run.cfg, run.model, run.objective
    s = objective.settings
    with autocast_for(cfg, run.device):
        completions = sample(model, run.tokenizer, prompts, s, run.ctx)
    scores = objective.rewards(run.tokenizer, prompts, completions)
    seqs = sequences(prompts, completions)
    width = max(len(c) for c in completions)
    lengths = torch.tensor([len(c) for c in completions])
    mask = (torch.arange(width)[None, :] < lengths[:, None]).float().to(run.device)
    batch = collated(run, seqs)
    with autocast_for(cfg, run.device):
        policy = score_tokens(model, batch, width, run.ctx, values=True, entropy=True)
        with objective.reference(model):
            reference = score_tokens(model, batch, width, run.ctx, values=False)
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
            batch = collated(run, [ro.seqs[i] for i in chosen.tolist()])
            idx = chosen.to(run.device)
            mask, old_logps = ro.mask[idx], ro.logps[idx]
            with autocast_for(cfg, run.device):
                new = score_tokens(run.model, batch, ro.width, run.ctx, values=True)
            pg, clip_fraction = policy_loss(new["logps"], old_logps, ro.advantages[idx], mask, s.clip_range)
            vf = value_loss(new["values"], ro.values[idx], ro.returns[idx], mask, s.value_clip_range)
            (pg + s.value_coef * vf).backward()
            lr, _ = apply_update(run, params, optimizer, scheduler)
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
            completions = sample(run.model, run.tokenizer, chunk, run.objective.settings, run.ctx, greedy=True)
        total += float(run.objective.rewards(run.tokenizer, chunk, completions).sum())
    return total / len(prompts)


def _held_out_reward(run: Run) -> dict | None:
    reward = mean_reward(run, run.data.eval)
    return None if reward is None else {"reward": reward}


def _step(run: Run, micro: list[list], params, optimizer, scheduler) -> tuple[dict, int]:
    s = run.objective.settings
    t0 = time.perf_counter()
    ro = rollout(run, [prompt for mb in micro for prompt in mb])
    losses = optimize(run, ro, params, optimizer, scheduler)
    tokens = sum(len(x) for x in ro.seqs)
    row = {"loss": losses["policy_loss"] + s.value_coef * losses["value_loss"], **ro.stats, **losses,
           "tokens": tokens, "tokens_per_s": tokens / (time.perf_counter() - t0)}
    return row, tokens


def algorithm(cfg: RunConfig, objective) -> Algorithm:
    s = objective.settings
    return Algorithm(_step, _held_out_reward, "reward", "held-out mean reward",
                     updates_per_step=s.epochs * math.ceil(cfg.train.batch_size / s.minibatch_size), train_mode=False)
