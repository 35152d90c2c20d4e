"""The token-level distillation losses: how far the student's next-token distribution is from the teacher's.

With p_S = softmax(z_S / T), p_T = softmax(z_T / T) at one answer position and M = (1 - β)·p_S + β·p_T:
    forward KL:       KL(p_T || p_S) = Σ p_T (log p_T - log p_S)              (β = 0)
    reverse KL:       KL(p_S || p_T) = Σ p_S (log p_S - log p_T)              (β = 1)
    generalized JSD:  β·KL(p_T || M) + (1 - β)·KL(p_S || M)                   (0 < β < 1)
exactly as TRL's GKDTrainer.generalized_jsd_loss defines them (GKD, Agarwal et al. 2024, eq. 1): the logits are
divided by T and the loss is not multiplied by T². Each is summed over the vocabulary per position; the caller sums
positions and the loop divides by the answer tokens, which is TRL's "batchmean" over label positions.

`divergence_sum` never holds more than one chunk of positions' vocabulary-wide tensors at once: each chunk's
student logits are recomputed in the backward pass (activation checkpointing) instead of kept.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint


def generalized_jsd(student_logits: torch.Tensor, teacher_logits: torch.Tensor, beta: float,
                    temperature: float = 1.0) -> torch.Tensor:
    """Per-position divergence (N,) of logits (N, V), in fp32 at least; gradients reach the student's logits only
    through what the caller lets through (the teacher's come in detached)."""
    dtype = torch.promote_types(student_logits.dtype, torch.float32)
    log_s = F.log_softmax(student_logits.to(dtype) / temperature, dim=-1)
    log_t = F.log_softmax(teacher_logits.to(dtype) / temperature, dim=-1)
    if beta == 0:
        return (log_t.exp() * (log_t - log_s)).sum(-1)
    if beta == 1:
        return (log_s.exp() * (log_s - log_t)).sum(-1)
    log_m = torch.logsumexp(torch.stack([log_s + math.log1p(-beta), log_t + math.log(beta)]), dim=0)
    kl_teacher = (log_t.exp() * (log_t - log_m)).sum(-1)
    kl_student = (log_s.exp() * (log_s - log_m)).sum(-1)
    return beta * kl_teacher + (1 - beta) * kl_student


def divergence_sum(student_hidden: torch.Tensor, teacher_hidden: torch.Tensor,
                   student_logits: Callable[[torch.Tensor], torch.Tensor],
                   teacher_logits: Callable[[torch.Tensor], torch.Tensor], beta: float, temperature: float,
                   chunk: int | None = None) -> torch.Tensor:
    """Σ over positions of `generalized_jsd` between the heads' logits of aligned hidden-state rows (N, H_S) and
    (N, H_T); the teacher's logits are computed under no_grad. With `chunk`, `chunk` rows at a time, each chunk's
    logits rebuilt in the backward pass."""

    def part(s_rows: torch.Tensor, t_rows: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            teacher = teacher_logits(t_rows)
        return generalized_jsd(student_logits(s_rows), teacher, beta, temperature).sum()

    n = student_hidden.shape[0]
    if not chunk or n <= chunk:
        return part(student_hidden, teacher_hidden)
    total = student_hidden.new_zeros((), dtype=torch.float32)
    for i in range(0, n, chunk):
        rows = slice(i, i + chunk)
        if torch.is_grad_enabled() and student_hidden.requires_grad:
            total = total + checkpoint(part, student_hidden[rows], teacher_hidden[rows], use_reentrant=False)
        else:
            total = total + part(student_hidden[rows], teacher_hidden[rows])
    return total
