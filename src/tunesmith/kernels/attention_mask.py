"""The attention mask in the form the model's attention implementation reads, with the model's sliding windows.

A packed batch's block-diagonal mask (data/packing.py) is built without the model; transformers takes a 4D mask as
it is, for every layer, so the sliding windows that it would have built into the masks it makes itself (Mistral,
Phi-3 with a window, Qwen2 with `use_sliding_window`, Gemma-2/3's alternating layers) are added here, as it names
them: each layer's type from `config.layer_types` ("sliding_attention" has `config.sliding_window`), or without
layer types one window for every layer where the config sets one. Models whose layers differ read a mask per layer
type (a dict), which is what they are given.
"""

from __future__ import annotations

import torch

FULL, SLIDING = "full_attention", "sliding_attention"


def layer_types(config) -> list[str]:
    """The attention type of each decoder layer, as transformers names it."""
    types = getattr(config, "layer_types", None)
    if types:
        return list(types)
    windowed = getattr(config, "sliding_window", None) and getattr(config, "use_sliding_window", True) is not False
    return [SLIDING if windowed else FULL] * config.num_hidden_layers


def window_of(config, layer_type: str) -> int | None:
    """The sliding window of a layer of `layer_type` (None: causal over the whole sequence)."""
    return config.sliding_window if layer_type == SLIDING else None


def unknown_layer_types(config) -> set[str]:
    """Layer types whose mask this module does not know how to build (chunked, linear, ...)."""
    return set(layer_types(config)) - {FULL, SLIDING}


def windowed(mask: torch.Tensor, window: int | None) -> torch.Tensor:
    """A square boolean (..., L, L) mask that lets each query see only the `window` latest keys, itself included."""
    if window is None or window >= mask.shape[-1]:
        return mask
    n = mask.shape[-1]
    return mask & torch.ones((n, n), dtype=torch.bool, device=mask.device).triu(1 - window)


def _for_implementation(model, mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Eager attention adds its mask to the scores: 0 where attending is allowed, dtype's minimum elsewhere."""
    if model.config._attn_implementation == "eager":
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, torch.finfo(dtype).min)
    return mask


def attention_mask_for(model, mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor | dict[str, torch.Tensor]:
    """A 2D mask as is; a boolean (B, 1, Q, K) mask with the model's sliding windows where it is square (Q = K: the
    queries are the keys), one mask per layer type where those differ, each in the form the implementation reads."""
    if mask.ndim != 4:
        return mask
    config = model.config
    types = set(layer_types(config))
    if mask.shape[-1] != mask.shape[-2] or types - {FULL, SLIDING}:
        return _for_implementation(model, mask, dtype)
    masks = {t: _for_implementation(model, windowed(mask, window_of(config, t)), dtype) for t in sorted(types)}
    if len({window_of(config, t) for t in types}) == 1:
        return next(iter(masks.values()))
    return masks
