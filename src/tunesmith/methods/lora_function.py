"""A frozen linear layer and its LoRA update as one autograd node: y = x·W0ᵀ + b + s·(x̃·Aᵀ)·Bᵀ, x̃ = dropout(x).

Built from the plain ops, autograd records seven nodes per layer; the low-rank update is added in a copy of the
base output, and the input gradient is two products followed by an addition pass. Here the forward adds s·(x̃·Aᵀ)·Bᵀ
into the base output in place (one addmm_), and the backward forms the input gradient as x's base product with the
low-rank product accumulated into it by the same matrix call (addmm_), with no separate addition or temporary.
Only the order of floating-point operations differs from the plain ops (tests/test_lora_function.py).

Dropout happens inside the node and keeps its mask as booleans: nn.Dropout on CPU keeps its scaled noise in the
input's dtype and the adapter's A keeps the dropped input, 8 bytes a feature in fp32 for each adapted linear; the
node keeps x (one tensor for every linear that reads it: q, k and v share it) and a 1-byte mask, and forms the
dropped input again in the backward. Its draws are nn.Dropout's on CPU (bernoulli_ on a tensor like x, scaled by
1/(1 − p)), so a run computes the same mask, and the same values, as the plain ops. (The plain path keeps
nn.Dropout: a boolean-mask dropout there lowered what autograd saves but raised QLoRA's peak RSS at 8 × 512, 11,357
→ 12,129 MiB, measured 2026-12-04.)

It serves layers whose base weight is frozen and stored in the input's dtype, outside autocast; everything else
(4-bit bases, bf16 autocast, a trainable base) takes LoraLinear's plain path. A base layer that kernels/onednn_linear.py
switched to oneDNN has its two products run there, and so do the low-rank products (MKL ran the rank-8 ones 1.5–5×
slower on AMD Zen 5: grad·B 324 against 80 µs, gradᵀ·(x·Aᵀ) 766 against 445 µs for 1150 tokens × 512 features).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tunesmith.kernels import onednn_linear
from tunesmith.kernels.patches import is_plain_linear


def draw_mask(x: torch.Tensor, p: float) -> torch.Tensor:
    """Which features of `x` are kept: nn.Dropout's CPU draws for a tensor like x, as booleans."""
    return torch.empty_like(x).bernoulli_(1 - p).bool()


def noise(keep: torch.Tensor, p: float, dtype: torch.dtype) -> torch.Tensor:
    """nn.Dropout's CPU noise from its mask: 1/(1 − p) where kept, else 0, in `dtype`."""
    return keep.to(dtype).div_(1 - p)


class _FrozenLinearWithLora(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, a, b, scaling: float, dropout: float, onednn: bool):
        """`dropout`: the adapter's dropout probability (0 outside training); `onednn`: the products other than the
        two in-place accumulations go through kernels/onednn_linear.py."""
        out = onednn_linear.product(x, weight, bias) if onednn else F.linear(x, weight, bias)
        flat_x = x.reshape(-1, x.shape[-1])
        keep = None
        if dropout:
            keep = draw_mask(flat_x, dropout)
            low_input = flat_x * noise(keep, dropout, flat_x.dtype)
        else:
            low_input = flat_x
        low = onednn_linear.product(low_input, a) if onednn else torch.mm(low_input, a.t())
        del low_input
        out.view(-1, out.shape[-1]).addmm_(low, b.t(), alpha=scaling)
        ctx.save_for_backward(flat_x, keep, low, weight, a, b)
        ctx.scaling, ctx.dropout, ctx.input_shape, ctx.onednn = scaling, dropout, x.shape, onednn
        return out

    @staticmethod
    def backward(ctx, grad_out):
        flat_x, keep, low, weight, a, b = ctx.saved_tensors
        s, p, dnn = ctx.scaling, ctx.dropout, ctx.onednn
        grad = grad_out.reshape(-1, grad_out.shape[-1])
        grad_low = (onednn_linear.input_grad(grad, b) if dnn else torch.mm(grad, b)).mul_(s)  # (tokens, r): small
        scaled = None if keep is None else noise(keep, p, flat_x.dtype)
        needs = ctx.needs_input_grad
        grad_x = grad_bias = grad_a = grad_b = None
        if needs[0]:
            grad_x = onednn_linear.input_grad(grad, weight) if dnn else torch.mm(grad, weight)
            if scaled is None:
                grad_x.addmm_(grad_low, a)
            else:
                grad_x.addcmul_(onednn_linear.input_grad(grad_low, a) if dnn else torch.mm(grad_low, a), scaled)
            grad_x = grad_x.view(ctx.input_shape)
        if needs[2]:
            grad_bias = grad.sum(0)
        if needs[3]:
            low_input = flat_x if scaled is None else flat_x * scaled
            grad_a = onednn_linear.weight_grad(grad_low, low_input) if dnn else torch.mm(grad_low.t(), low_input)
        if needs[4]:
            grad_b = (onednn_linear.weight_grad(grad, low) if dnn else torch.mm(grad.t(), low)).mul_(s)
        return grad_x, None, grad_bias, grad_a, grad_b, None, None, None


def applies(x: torch.Tensor, base_layer, a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether the fused node computes this call: a plain frozen nn.Linear, one dtype throughout, no autocast."""
    if not is_plain_linear(base_layer) or base_layer.weight.requires_grad:
        return False
    if torch.is_autocast_enabled(x.device.type):
        return False
    dtype = base_layer.weight.dtype
    return x.dtype == dtype and a.dtype == dtype and b.dtype == dtype


def frozen_linear_with_lora(x: torch.Tensor, base_layer: torch.nn.Linear, a: torch.Tensor, b: torch.Tensor,
                            scaling: float, dropout: float) -> torch.Tensor:
    """`dropout`: the probability the adapter drops an input feature with (0: none, or not training)."""
    if not 0 <= dropout < 1:
        raise ValueError(f"dropout probability {dropout} is not in [0, 1)")
    onednn = isinstance(base_layer, onednn_linear.OneDNNLinear) and onednn_linear.applies(x, base_layer.weight)
    return _FrozenLinearWithLora.apply(x, base_layer.weight, base_layer.bias, a, b, scaling, float(dropout), onednn)
