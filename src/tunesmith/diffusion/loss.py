"""The denoising loss: each sample's mean squared error against the target (noise.py), optionally weighted per sample
(min-SNR), averaged within named groups of rows and summed with each group's weight. DreamBooth's groups: the
instance images and the class images (prior preservation): total = instance + weight · prior."""

from __future__ import annotations

import torch


def per_sample_mse(prediction: torch.Tensor, goal: torch.Tensor) -> torch.Tensor:
    return (prediction.float() - goal.float()).pow(2).flatten(1).mean(1)


def grouped_loss(per_sample: torch.Tensor, groups: dict[str, tuple[int, int, float]]):
    """(total, {name: term}): groups name → (first row, end row, weight); a group of weight 0 or no rows gives a
    zero term and adds nothing."""
    terms, total = {}, None
    for name, (start, stop, weight) in groups.items():
        if weight == 0 or stop <= start:
            terms[name] = torch.zeros((), device=per_sample.device)
            continue
        terms[name] = per_sample[start:stop].mean()
        total = terms[name] * weight if total is None else total + terms[name] * weight
    return total, terms

