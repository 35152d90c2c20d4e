"""A frozen linear layer whose weight is stored as packed int4 codes with per-group scales and zeros, and is
dequantised on the fly for each matmul. It is an nn.Linear to the rest of the code (LoRA wraps it like any
linear layer), but holds no parameters: nothing in it can train."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from tunesmith.quant import int4


class Int4Linear(nn.Linear):
    def __init__(self, in_features: int, out_features: int, group_size: int, bias: bool = False, device=None):
        nn.Module.__init__(self)  # not nn.Linear's: no float weight parameter
        self.in_features, self.out_features, self.group_size = in_features, out_features, group_size
        groups = int4.n_groups(in_features, group_size)
        self.register_buffer("qweight", torch.zeros(out_features, in_features // 2, dtype=torch.uint8, device=device))
        self.register_buffer("scales", torch.zeros(out_features, groups, dtype=torch.float16, device=device))
        self.register_buffer("zeros", torch.zeros(out_features, groups, dtype=torch.uint8, device=device))
        self.register_buffer("bias", torch.zeros(out_features, device=device) if bias else None)

    @classmethod
    def from_codes(cls, codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int,
                   bias: torch.Tensor | None = None) -> "Int4Linear":
        out_features, in_features = codes.shape
        layer = cls(in_features, out_features, group_size, bias is not None, device=codes.device)
        layer.qweight.copy_(int4.pack(codes))
        layer.scales.copy_(scales)
        layer.zeros.copy_(zeros)
        if bias is not None:
            layer.bias.copy_(bias.detach())
        return layer

    def dequantized(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return int4.dequantize_weight(int4.unpack(self.qweight), self.scales, self.zeros, self.group_size, dtype)

    @property
    def weight(self) -> torch.Tensor:
        """The dequantised weight, a fresh tensor each time (for code that reads `.weight`: writes to it are lost)."""
        return self.dequantized(torch.float32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
        bias = None if self.bias is None else self.bias.to(dtype)
        return F.linear(x.to(dtype), self.dequantized(dtype), bias)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits=4, "
                f"group_size={self.group_size}, bias={self.bias is not None}")
