"""Products with frozen fp32 weights through oneDNN on CPU: the forward x·Wᵀ + b and the input gradient g·W.

PyTorch runs fp32 matrix products on CPU through MKL's sgemm. oneDNN's inner-product kernels, which PyTorch also
ships, ran the shapes of a LoRA fine-tune 15–35 % faster on this project's CPU machines (AMD EPYC with AVX-512;
bench/peers.py workloads, T tokens × 512–1536 features: 183–196 against 134–174 GFLOP/s; the LM head's products
143/186 against 118/148), with results equal up to the order of the sums (relative 1e-6). A frozen weight needs no
weight gradient, so both of its products (forward and input gradient) can go there; oneDNN reads the transposed
weight as a strided view, so nothing is copied. Weight gradients, trainable weights, bf16 autocast and CUDA keep
PyTorch's own path. Generation takes the same path (one token's products measured as fast or faster: 42 against
69 µs for 576 → 1536), and so does a reference model with its adapters switched off, which therefore computes
exactly what the policy computed before its first step (DPO's reference, objectives/dpo.py).

`enable(model)` (train.onednn_linear) gives the frozen nn.Linear layers of a model a forward that takes this path
when it applies; the output embedding is left alone and flagged instead, since the chunked cross-entropy runs its
products itself (objectives/chunked_ce.py).
"""

from __future__ import annotations

import functools

import torch
from torch import nn


@functools.cache
def _op():
    try:
        op = torch.ops.mkldnn._linear_pointwise
        if not torch.backends.mkldnn.is_available():
            return None
        x, w = torch.ones(2, 3), torch.ones(4, 3)
        if not torch.equal(op(x, w, None, "none", [], ""), x @ w.T):
            return None
        return op
    except (AttributeError, RuntimeError):
        return None


def applies(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether the oneDNN path computes this product: fp32 CPU tensors, no autocast, oneDNN present, and not
    inside torch.compile (inductor lowers this op only for weights it holds as constants; it picks its own kernels)."""
    return (x.device.type == "cpu" and x.dtype == torch.float32 and weight.dtype == torch.float32
            and not torch.is_autocast_enabled("cpu") and not torch.compiler.is_compiling() and _op() is not None)


def product(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x·Wᵀ + b for x (..., in), weight (out, in); call only where `applies` holds."""
    flat = x.reshape(-1, x.shape[-1])
    return _op()(flat, weight, bias, "none", [], "").view(*x.shape[:-1], weight.shape[0])


def input_grad(grad: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """grad·W for grad (tokens, out), weight (out, in): the gradient of x·Wᵀ with respect to x."""
    return _op()(grad, weight.t(), None, "none", [], "")


class _FrozenLinearFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(weight)
        ctx.input_shape = x.shape
        return product(x, weight, bias)

    @staticmethod
    def backward(ctx, grad_out):
        (weight,) = ctx.saved_tensors
        grad = grad_out.reshape(-1, grad_out.shape[-1])
        grad_x = input_grad(grad, weight).view(ctx.input_shape) if ctx.needs_input_grad[0] else None
        grad_bias = grad.sum(0) if ctx.needs_input_grad[2] else None
        return grad_x, None, grad_bias


class FrozenLinear(nn.Linear):
    """An nn.Linear whose products with its frozen weight run through oneDNN."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.weight.requires_grad or not applies(x, self.weight):
            return super().forward(x)
        if not torch.is_grad_enabled():
            return product(x, self.weight, self.bias)
        return _FrozenLinearFunction.apply(x, self.weight, self.bias)


def enable(model: nn.Module) -> int:
    """Give the frozen fp32 nn.Linear layers of `model` (and its chunked cross-entropy, through the
    `tunesmith_onednn` flag) the oneDNN path; returns how many layers it changed."""
    if _op() is None:
        return 0
    model.tunesmith_onednn = True
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    changed = 0
    for module in model.modules():
        if (type(module) is nn.Linear and module is not head and not module.weight.requires_grad
                and module.weight.dtype == torch.float32 and module.weight.device.type == "cpu"):
            module.__class__ = FrozenLinear
            changed += 1
    return changed
