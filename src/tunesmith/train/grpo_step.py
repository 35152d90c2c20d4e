"""GRPO's step: a generation batch (train.batch_size prompts × G completions, sampled in one cached
decode, scored, advantages within each group), then grpo.num_iterations optimizer steps over it, each accumulating
the whole batch in grpo.minibatch_size pieces.

The loop around a step (set-up, resume, evaluation, checkpoints, report) is the one every objective trains in,
train/loop.py; the model stays in eval mode there, as under PPO.
"""

from __future__ import annotations

import time
from contextlib import nullcontext
from dataclasses import dataclass

import torch

from tunesmith.devices import autocast_for
from tunesmith.objectives.group_sampling import sample_groups
from tunesmith.objectives.grpo import completion_logps, group_advantages, reduce_losses, token_losses
from tunesmith.objectives.ppo import sequences
from tunesmith.train.algorithm import Algorithm, apply_update
from tunesmith.train.ppo_step import collated


@dataclass
class GenerationBatch:
    seqs: list
    width: int
    mask: torch.Tensor        # (N, width) 1 on completion tokens
    old_logps: torch.Tensor   # the sampling policy's, (N, width)
    ref_logps: torch.Tensor | None
    advantages: torch.Tensor  # (N,)
    stats: dict


def _scored(run, seqs: list, width: int, reference: bool = False) -> torch.Tensor:
    """(N, width) completion-token log-probs, minibatch_size sequences at a time (no gradient)."""
    s = run.objective.settings
    rows = []
    for i in range(0, len(seqs), s.minibatch_size):
        batch = collated(run, seqs[i : i + s.minibatch_size])
        with autocast_for(run.cfg, run.device), (run.objective.reference(run.model) if reference else nullcontext()):
            rows.append(completion_logps(run.model, batch, width, run.ctx, s.temperature))
    return torch.cat(rows)


@torch.no_grad()
def generate(run, prompts: list) -> GenerationBatch:
    s = run.objective.settings
    with autocast_for(run.cfg, run.device):
        completions = sample_groups(run.model, run.tokenizer, prompts, s.num_generations, s.max_new_tokens, run.ctx,
                                    s.temperature, s.top_k)
    each = [p for p in prompts for _ in range(s.num_generations)]
    per_function = run.objective.rewards.per_function(run.tokenizer, each, completions)
    rewards = run.objective.rewards.total(per_function)
    advantages = group_advantages(rewards, s.num_generations, s.scale_rewards).to(run.device)
    seqs = sequences(each, completions)
    width = max(1, max(len(c) for c in completions))
    lengths = torch.tensor([len(c) for c in completions])
    mask = (torch.arange(width)[None, :] < lengths[:, None]).float().to(run.device)
    old = _scored(run, seqs, width) if s.num_iterations > 1 else None
    ref = _scored(run, seqs, width, reference=True) if s.beta else None
    eos = run.tokenizer.eos_token_id
    stats = {"reward": float(rewards.mean()), "reward_std": float(rewards.std()),
             "completion_tokens": float(lengths.float().mean()),
             "ended": sum(bool(c) and c[-1] == eos for c in completions) / len(completions),
             "groups_without_spread": float((rewards.view(-1, s.num_generations).std(1) == 0).float().mean())}
    for k, name in enumerate(run.objective.rewards.names):
        stats[f"reward/{name}/mean"] = float(per_function[:, k].mean())
        stats[f"reward/{name}/std"] = float(per_function[:, k].std())
    return GenerationBatch(seqs, width, mask, old, ref, advantages, stats)


def optimize(run, gb: GenerationBatch, params, optimizer, scheduler) -> dict:
    """num_iterations optimizer steps, each over the whole generation batch (gradients accumulated)."""
    cfg, s = run.cfg, run.objective.settings
    n, n_tokens = len(gb.seqs), int(gb.mask.sum())
    high = s.epsilon_high if s.epsilon_high is not None else s.epsilon
    sums = {"loss": 0.0, "clip_fraction": 0.0, "kl": 0.0}
    for _ in range(s.num_iterations):
        loss_total = 0.0
        clipped = kl = 0.0
        for start in range(0, n, s.minibatch_size):
            idx = slice(start, start + s.minibatch_size)
            batch = collated(run, gb.seqs[idx])
            with autocast_for(cfg, run.device):
                logps = completion_logps(run.model, batch, gb.width, run.ctx, s.temperature)
            mask = gb.mask[idx]
            old = gb.old_logps[idx] if gb.old_logps is not None else logps.detach()
            ref = gb.ref_logps[idx] if gb.ref_logps is not None else None
            losses, stats = token_losses(logps, old, gb.advantages[idx], mask, s.epsilon, high, s.beta, ref)
            loss = reduce_losses(losses, mask, s.loss_type, s.max_new_tokens, n, n_tokens)
            loss.backward()
            loss_total += float(loss.detach())
            clipped += float((stats["clipped"] * mask).sum())
            if "kl" in stats:
                kl += float((stats["kl"] * mask).sum())
        lr, _ = apply_update(run, params, optimizer, scheduler)
        sums["loss"] += loss_total
        sums["clip_fraction"] += clipped / max(n_tokens, 1)
        sums["kl"] += kl / max(n_tokens, 1)
    out = {k: v / s.num_iterations for k, v in sums.items()}
    if not s.beta:
        del out["kl"]
    return {**out, "lr": lr}


@torch.no_grad()
def mean_reward(run) -> dict | None:
    """Mean weighted reward (and each reward's mean) of greedy answers to the held-out prompts."""
    prompts = run.data.eval
    if not prompts:
        return None
    s = run.objective.settings
    rewards = run.objective.rewards
    scores = []
    bs = max(run.cfg.train.batch_size, s.minibatch_size)  # one completion per prompt: as many as a minibatch holds
    for i in range(0, len(prompts), bs):
        chunk = prompts[i : i + bs]
        with autocast_for(run.cfg, run.device):
            completions = sample_groups(run.model, run.tokenizer, chunk, 1, s.max_new_tokens, run.ctx, greedy=True)
        scores.append(rewards.per_function(run.tokenizer, chunk, completions))
    per_function = torch.cat(scores)
    out = {"reward": float(rewards.total(per_function).mean())}
    out.update({f"reward/{name}": float(per_function[:, k].mean()) for k, name in enumerate(rewards.names)})
    return out


def _step(run, micro: list[list], params, optimizer, scheduler) -> tuple[dict, int]:
    t0 = time.perf_counter()
    gb = generate(run, [prompt for mb in micro for prompt in mb])
    t1 = time.perf_counter()
    losses = optimize(run, gb, params, optimizer, scheduler)
    tokens = sum(len(x) for x in gb.seqs)
    row = {**losses, **gb.stats, "tokens": tokens, "tokens_per_s": tokens / (time.perf_counter() - t0),
           "completions_per_s": len(gb.seqs) / (t1 - t0)}
    return row, tokens


def algorithm(cfg, objective) -> Algorithm:
    return Algorithm(_step, mean_reward, "reward", "held-out mean reward",
                     updates_per_step=objective.settings.num_iterations, train_mode=False)
