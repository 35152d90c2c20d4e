"""The attention mask in the form the model's attention implementation reads."""

from __future__ import annotations

import torch


def attention_mask_for(model, mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A boolean (B, 1, Q, K) mask as is, except for eager attention, which adds its mask to the scores: there it
    becomes 0 where attending is allowed and dtype's minimum elsewhere."""
    if mask.ndim == 4 and model.config._attn_implementation == "eager":
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, torch.finfo(dtype).min)
    return mask
