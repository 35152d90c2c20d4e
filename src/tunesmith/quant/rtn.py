"""Round-to-nearest: every weight to the nearest point of its group's min-max grid, independently of the others.
The baseline GPTQ has to beat."""

from __future__ import annotations

import torch

from tunesmith.quant import int4


@torch.no_grad()
def quantize_weight(weight: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(codes uint8 rows × in, scales fp16 rows × groups, zeros uint8 rows × groups)."""
    w = weight.detach().float()
    rows, cols = w.shape
    codes = torch.empty(rows, cols, dtype=torch.uint8, device=w.device)
    groups = int4.n_groups(cols, group_size)
    scales = torch.empty(rows, groups, device=w.device)
    zeros = torch.empty(rows, groups, device=w.device)
    for g in range(groups):
        block = w[:, g * group_size:(g + 1) * group_size]
        scale, zero = int4.grid(block)
        codes[:, g * group_size:(g + 1) * group_size] = int4.quantize(block, scale[:, None], zero[:, None])
        scales[:, g], zeros[:, g] = scale, zero
    return codes, scales.half(), zeros.to(torch.uint8)
