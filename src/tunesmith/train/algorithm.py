"""What an objective's training algorithm gives the one outer loop (train/loop.py): how one step trains, how the
held-out set is scored; and the optimizer update every step makes. The loop owns everything around a step: set-up,
the schedule, resume, logging, evaluation, checkpoints, ranks, the forgetting probe and the saved artifact."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable


@dataclass(frozen=True)
class Algorithm:
    # (run, micro-batches of this rank's examples, params, optimizer, scheduler) -> (the step's metrics row, tokens)
    step: Callable
    held_out: Callable  # (run) -> the held-out metrics {"loss" or "reward": ..., ...}, or None without held-out data
    headline: str = "loss"  # the held-out metric the console shows
    headline_label: str = "held-out loss"
    updates_per_step: int = 1  # optimizer steps per loop step: what the schedule counts
    train_mode: bool = True  # False: the model stays in eval mode (no dropout), as PPO's and GRPO's sampling needs


def apply_update(run, params: list, optimizer, scheduler) -> tuple[float, float | None]:
    """Clip the gradients to train.max_grad_norm (if set), take one optimizer step and move the schedule on; returns
    the learning rate this update applied and the gradient norm before clipping (None when not clipped)."""
    max_norm = run.cfg.train.max_grad_norm
    grad_norm = run.ranks.clip(params, max_norm) if max_norm else None
    lr = scheduler.get_last_lr()[0]  # the rate this update applies; scheduler.step() moves to the next one
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return lr, grad_norm
