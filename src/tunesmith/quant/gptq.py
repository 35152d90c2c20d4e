"""GPTQ (Frantar et al., 2022): quantise a linear layer's weight column by column, pushing each column's rounding
error onto the columns not yet quantised so that the layer's output on the calibration inputs X changes as little
as possible (the objective is ||X·Wᵀ − X·Ŵᵀ||², whose curvature is H = XᵀX).

For column j with inverse-Hessian row h = [H⁻¹]_j (taken from the upper Cholesky factor of H⁻¹, which gives the
sequential updates in one shot): err = (w_j − q(w_j)) / h_jj, then w_k −= err · h_jk for every later column k.
Updates inside a block of columns are applied at once to the columns after the block ("lazy batch updates").
H is damped by a fraction of its mean diagonal so the Cholesky factorisation exists even for few samples.
"""

from __future__ import annotations

import math
from contextlib import contextmanager

import torch

from tunesmith.errors import ModelError
from tunesmith.quant import int4


class HessianAccumulator:
    """H = (2/N) Σ x xᵀ over the N input rows a linear layer sees (a forward hook feeds it)."""

    def __init__(self, in_features: int, device):
        self.H = torch.zeros(in_features, in_features, device=device, dtype=torch.float32)
        self.n = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).float()
        total = self.n + x.shape[0]
        self.H.mul_(self.n / total)
        x = x * math.sqrt(2 / total)
        self.H.addmm_(x.T, x)
        self.n = total

    def hook(self, module, inputs, output) -> None:
        self.add(inputs[0])


def inverse_hessian_factor(H: torch.Tensor, damp: float, name: str = "layer") -> torch.Tensor:
    """Upper Cholesky factor U of (H + λI)⁻¹ with λ = damp · mean(diag H); U's row j holds column j's updates."""
    H = H.clone()
    H += damp * torch.mean(torch.diag(H)) * torch.eye(H.shape[0], device=H.device, dtype=H.dtype)
    L, info = torch.linalg.cholesky_ex(H)
    if info.item() != 0:
        raise ModelError(f"GPTQ: the Hessian of {name} is not positive definite even after damping {damp}; raise "
                         "--damp or use more calibration data")
    return torch.linalg.cholesky(torch.cholesky_inverse(L), upper=True)


@contextmanager
def one_thread():
    """The column loop is thousands of tiny ops: with several threads their synchronisation dominates (measured
    30× slower with 2 threads than 1 on a busy 2-core box)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@torch.no_grad()
def quantize_weight(weight: torch.Tensor, H: torch.Tensor, group_size: int, damp: float = 0.01,
                    block_size: int = 128, name: str = "layer") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """GPTQ codes, fp16 scales and zeros of `weight` (rows × in) for inputs with Hessian H (in × in)."""
    if weight.device.type == "cpu":
        with one_thread():
            return _quantize_weight(weight, H, group_size, damp, block_size, name)
    return _quantize_weight(weight, H, group_size, damp, block_size, name)


def _quantize_weight(weight, H, group_size, damp, block_size, name):
    W = weight.detach().float().clone()
    rows, cols = W.shape
    H = H.to(W.device, torch.float32).clone()
    dead = torch.diag(H) == 0  # inputs that are always zero: their weights do not matter
    H[dead, dead] = 1
    W[:, dead] = 0
    U = inverse_hessian_factor(H, damp, name)

    block_size = group_size * max(1, block_size // group_size)  # groups never straddle a block
    codes = torch.empty(rows, cols, dtype=torch.uint8, device=W.device)
    groups = int4.n_groups(cols, group_size)
    scales = torch.empty(rows, groups, device=W.device)
    zeros = torch.empty(rows, groups, device=W.device)
    for b0 in range(0, cols, block_size):
        b1 = min(b0 + block_size, cols)
        Wb = W[:, b0:b1].clone()
        Ub = U[b0:b1, b0:b1]
        errors = torch.zeros_like(Wb)
        for j in range(b1 - b0):
            col = b0 + j
            if col % group_size == 0:  # the group's grid, from its columns as updated so far
                g = col // group_size
                scale, zero = int4.grid(Wb[:, j:j + group_size])
                scales[:, g], zeros[:, g] = scale, zero
            w = Wb[:, j]
            q = int4.quantize(w, scale, zero)
            codes[:, col] = q
            err = (w - int4.dequantize(q, scale, zero)) / Ub[j, j]
            Wb[:, j:] -= err[:, None] * Ub[j, j:][None, :]
            errors[:, j] = err
        W[:, b1:] -= errors @ U[b0:b1, b1:]
    return codes, scales.half(), zeros.to(torch.uint8)


def output_error(weight: torch.Tensor, approx: torch.Tensor, H: torch.Tensor) -> float:
    """tr((W−Ŵ) H (W−Ŵ)ᵀ): the layer's squared output change on the calibration inputs (times H's 2/N), which
    GPTQ minimises."""
    d = (weight.float() - approx.float())
    return float(torch.einsum("ij,jk,ik->", d, H.float(), d))
