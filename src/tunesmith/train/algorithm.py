"""What an objective's training algorithm gives the one outer loop (train/loop.py): how one step trains, how the
held-out set is scored. The loop owns everything around a step: set-up, the schedule, resume, logging, evaluation,
checkpoints, ranks, the forgetting probe and the saved artifact."""

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
