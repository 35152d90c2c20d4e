"""A frozen linear layer and its LoRA update as one autograd node: y = x·W0ᵀ + b + s·(x̃·Aᵀ)·Bᵀ, x̃ = dropout(x).

Built from the plain ops, autograd records seven nodes per layer; the low-rank update is added in a copy of the
base output, and the input gradient is two products followed by an addition pass. Here the forward adds s·(x̃·Aᵀ)·Bᵀ
into the base output in place (one addmm_), and the backward forms the input gradient as x's base product with the
low-rank product accumulated into it by the same matrix call (addmm_), with no separate addition or temporary.
Only the order of floating-point operations differs from the plain ops (tests/test_lora_function.py).

It serves layers whose base weight is frozen and stored in the input's dtype, outside autocast; everything else
(4-bit bases, bf16 autocast, a trainable base) takes LoraLinear's plain path. A base layer that kernels/onednn_linear.py
switched to oneDNN has its two products run there, and so do the low-rank products (MKL ran the rank-8 ones 1.5–5×
slower on AMD Zen 5: grad·B 324 against 80 µs, gradᵀ·(x·Aᵀ) 766 against 445 µs for 1150 tokens × 512 features).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tunesmith.kernels import onednn_linear


class _FrozenLinearWithLora(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, a, b, scaling: float, dropped, onednn: bool):
        """`dropped` is dropout(x) when the adapter has dropout, else None (the update then reads x itself);
        `onednn`: the products other than the two in-place accumulations go through kernels/onednn_linear.py."""
        low_input = x if dropped is None else dropped
        out = onednn_linear.product(x, weight, bias) if onednn else F.linear(x, weight, bias)
        flat_in = low_input.reshape(-1, low_input.shape[-1])
        low = onednn_linear.product(flat_in, a) if onednn else torch.mm(flat_in, a.t())
        out.view(-1, out.shape[-1]).addmm_(low, b.t(), alpha=scaling)
        ctx.save_for_backward(flat_in, low, weight, a, b)
        ctx.scaling, ctx.shared_input, ctx.input_shape, ctx.onednn = scaling, dropped is None, x.shape, onednn
        return out

    @staticmethod
    def backward(ctx, grad_out):
        flat_in, low, weight, a, b = ctx.saved_tensors
        s = ctx.scaling
        grad = grad_out.reshape(-1, grad_out.shape[-1])
        dnn = ctx.onednn
        grad_low = (onednn_linear.input_grad(grad, b) if dnn else torch.mm(grad, b)).mul_(s)  # (tokens, r): small
        needs = ctx.needs_input_grad
        grad_x = grad_bias = grad_a = grad_b = grad_dropped = None
        if needs[0]:
            grad_x = onednn_linear.input_grad(grad, weight) if dnn else torch.mm(grad, weight)
            if ctx.shared_input:
                grad_x.addmm_(grad_low, a)
            grad_x = grad_x.view(ctx.input_shape)
        if needs[6]:
            grad_dropped = onednn_linear.input_grad(grad_low, a) if dnn else torch.mm(grad_low, a)
            grad_dropped = grad_dropped.view(ctx.input_shape)
        if needs[2]:
            grad_bias = grad.sum(0)
        if needs[3]:
            grad_a = onednn_linear.weight_grad(grad_low, flat_in) if dnn else torch.mm(grad_low.t(), flat_in)
        if needs[4]:
            grad_b = (onednn_linear.weight_grad(grad, low) if dnn else torch.mm(grad.t(), low)).mul_(s)
        return grad_x, None, grad_bias, grad_a, grad_b, None, grad_dropped, None


def applies(x: torch.Tensor, base_layer, a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether the fused node computes this call: a plain frozen nn.Linear, one dtype throughout, no autocast."""
    if type(base_layer) not in (torch.nn.Linear, onednn_linear.OneDNNLinear) or base_layer.weight.requires_grad:
        return False
    if torch.is_autocast_enabled(x.device.type):
        return False
    dtype = base_layer.weight.dtype
    return x.dtype == dtype and a.dtype == dtype and b.dtype == dtype


def frozen_linear_with_lora(x: torch.Tensor, base_layer: torch.nn.Linear, a: torch.Tensor, b: torch.Tensor,
                            scaling: float, dropped: torch.Tensor | None) -> torch.Tensor:
    onednn = type(base_layer) is onednn_linear.OneDNNLinear and onednn_linear.applies(x, base_layer.weight)
    return _FrozenLinearWithLora.apply(x, base_layer.weight, base_layer.bias, a, b, scaling, dropped, onednn)
