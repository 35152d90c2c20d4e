"""The int4 format: asymmetric per-group grids (scale, zero point) along the input dimension, and two 4-bit codes
packed into each byte (even column in the low nibble).

A weight w in group g of its row is stored as q = clamp(round(w / s_g) + z_g, 0, 15) and read back as s_g·(q − z_g).
The grid of a group spans [min(w, 0), max(w, 0)], so zero is exactly representable. Scales are float16 (what is
stored is what the quantiser used); a row's last group may be narrower when in_features is not a multiple of the
group size.
"""

from __future__ import annotations

import math

import torch

BITS = 4
MAXQ = 2**BITS - 1


def n_groups(in_features: int, group_size: int) -> int:
    return math.ceil(in_features / group_size)


def grid(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, zero) per row of `w` (rows × group columns): the min-max grid including 0, scale rounded to fp16."""
    lo = w.min(dim=1).values.clamp(max=0)
    hi = w.max(dim=1).values.clamp(min=0)
    scale = ((hi - lo) / MAXQ).half().float()
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # an all-zero group: any scale will do
    zero = torch.round(-lo / scale).clamp(0, MAXQ)
    return scale, zero


def quantize(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """Codes 0..15 of `w` on the grid (scale and zero broadcast against w)."""
    return torch.clamp(torch.round(w / scale) + zero, 0, MAXQ)


def dequantize(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    return scale * (q - zero)


def expand(per_group: torch.Tensor, group_size: int, in_features: int) -> torch.Tensor:
    """(rows, groups) → (rows, in_features): each group's value repeated over its columns."""
    return per_group.repeat_interleave(group_size, dim=1)[:, :in_features]


def dequantize_weight(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int,
                      dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The full weight from unpacked codes (rows × in) and per-group scales and zeros (rows × groups), computed
    in float32 and then cast."""
    rows, cols = codes.shape
    groups = scales.shape[1]
    padded = groups * group_size
    if padded != cols:  # a narrower last group
        codes = torch.nn.functional.pad(codes, (0, padded - cols))
    w = (codes.view(rows, groups, group_size).float() - zeros.float()[..., None]) * scales.float()[..., None]
    return w.view(rows, padded)[:, :cols].to(dtype)


def pack(codes: torch.Tensor) -> torch.Tensor:
    """uint8 (..., 2n) codes in 0..15 → uint8 (..., n), two per byte."""
    if codes.shape[-1] % 2:
        raise ValueError(f"int4 packing needs an even number of columns, got {codes.shape[-1]}")
    c = codes.to(torch.uint8)
    return c[..., 0::2] | (c[..., 1::2] << 4)


def unpack(packed: torch.Tensor) -> torch.Tensor:
    """The inverse of pack."""
    return torch.stack((packed & 0x0F, packed >> 4), dim=-1).view(*packed.shape[:-1], packed.shape[-1] * 2)
