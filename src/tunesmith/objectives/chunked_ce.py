"""LM head + cross-entropy over label positions, a chunk of positions at a time.

The plain path keeps the (label positions × vocabulary) logits, and autograd keeps their softmax for the backward
pass. Here each chunk's logits live only while that chunk is processed: the forward pass also forms the gradient
with respect to the hidden states (and the head's weight, when it trains) chunk by chunk, and the backward pass only
scales those by the incoming gradient. The loss is the same sum of per-token cross-entropies; only the order of the
floating-point summation differs.
"""

from __future__ import annotations

import torch


def _compute_dtype(weight: torch.Tensor) -> torch.dtype:
    """What an nn.Linear would compute in here: the autocast dtype when autocast is on, else the weight's dtype."""
    device_type = weight.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return weight.dtype


def _chunk_logits(h: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return (h @ w.T).float()


class _LinearCrossEntropySum(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk: int, dtype: torch.dtype):
        w = weight.to(dtype)
        grad_hidden = torch.empty_like(hidden)
        grad_weight = torch.zeros_like(weight, dtype=torch.float32) if ctx.needs_input_grad[1] else None
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for start in range(0, hidden.shape[0], chunk):
            h = hidden[start : start + chunk].to(dtype)
            t = targets[start : start + chunk]
            logits = _chunk_logits(h, w)
            lse = torch.logsumexp(logits, dim=-1)
            total += (lse - logits.gather(1, t[:, None]).squeeze(1)).sum()
            # d(sum of cross-entropies)/d(logits) = softmax − one-hot(target)
            grad_logits = logits.sub_(lse[:, None]).exp_()
            grad_logits[torch.arange(t.shape[0], device=t.device), t] -= 1.0
            grad_logits = grad_logits.to(dtype)
            grad_hidden[start : start + chunk] = (grad_logits @ w).to(hidden.dtype)
            if grad_weight is not None:
                grad_weight += (grad_logits.T @ h).float()
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.weight_dtype = weight.dtype
        return total

    @staticmethod
    def backward(ctx, grad_total):
        grad_hidden, grad_weight = ctx.saved_tensors
        grad_h = grad_hidden * grad_total.to(grad_hidden.dtype) if ctx.needs_input_grad[0] else None
        grad_w = (grad_weight * grad_total).to(ctx.weight_dtype) if grad_weight is not None else None
        return grad_h, grad_w, None, None, None


def linear_cross_entropy_sum(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                             chunk: int) -> torch.Tensor:
    """sum over rows of cross_entropy(hidden @ weight.T, targets); hidden (N, H), weight (V, H), targets (N,)."""
    dtype = _compute_dtype(weight)
    if not torch.is_grad_enabled() or not (hidden.requires_grad or weight.requires_grad):
        w = weight.to(dtype)
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for start in range(0, hidden.shape[0], chunk):
            logits = _chunk_logits(hidden[start : start + chunk].to(dtype), w)
            t = targets[start : start + chunk]
            total += (torch.logsumexp(logits, dim=-1) - logits.gather(1, t[:, None]).squeeze(1)).sum()
        return total
    return _LinearCrossEntropySum.apply(hidden, weight, targets, chunk, dtype)
