"""Attention over one padding-free row of several examples, each attending causally to itself only.

A packed batch (data/packing.py) is rows of whole examples with a block-diagonal mask, and the row ends are padding.
When the model's attention goes through transformers' attention interface as SDPA or eager attention, `hidden_states`
instead drops every pad token, runs the decoder on one row laid out by data/shared_prefixes.py, and this attention
function attends each segment of that row on its own: a segment with no ancestor attends causally to its own slice;
a segment that continues a shared prefix attends to its ancestors' keys and values and then causally to itself. A
layer with a sliding window (kernels/attention_mask.py: the layer types and window transformers builds its masks
from) sees only that many latest keys of its example. SDPA runs its kernel on each segment; eager attention (Gemma-2,
whose logit soft-capping SDPA cannot compute) runs the model's own `eager_attention_forward` on each segment with that
segment's mask. No padding is computed, and no attention score is formed between different examples. The outputs are
those of the block-diagonal mask; only the floating-point order differs.

`enable(model)` switches a loaded model to the registered implementation standing in for the one it had. Without a
segment layout in the call, it is that implementation with the usual masks, so generation, padded batches and
virtual-token methods run as before. The layout travels as a keyword argument through the model's forward, which
another model class or transformers version may drop or never hand to this function; the row's placeholder mask
would then let every token attend to every other, so `run_decoder` raises `SegmentAttentionError` instead
(train.segment_attention: false avoids it). `unsupported(model)` says why a model cannot take it (another attention
implementation, a layer type whose mask is unknown, an encoder-decoder); `enable` then changes nothing.
"""

from __future__ import annotations

import sys
from contextvars import ContextVar

import torch
import torch.nn.functional as F
from torch.torch_version import TorchVersion

from tunesmith.errors import ModelError
from tunesmith.kernels.attention_mask import layer_types, unknown_layer_types, window_of
from tunesmith.kernels.attention_precision import bf16_on_cpu
from tunesmith.kernels.patches import Patch

NAME = "tunesmith_segments"
NAME_EAGER = "tunesmith_segments_eager"
LAYOUT_KWARG = "tunesmith_segment_layout"
_registered = False
_SDPA_HAS_GQA = TorchVersion(torch.__version__) >= "2.5"
# while run_decoder runs: how many attention calls received the layout (None outside run_decoder)
_layout_calls: ContextVar[list | None] = ContextVar("tunesmith_segment_layout_calls", default=None)


class SegmentAttentionError(ModelError):
    """The segment layout of a packed row did not reach the attention function."""


def _layout_lost(model_class: str, where: str) -> SegmentAttentionError:
    import transformers

    return SegmentAttentionError(
        f"segment attention: the packed row's segment layout {where} in {model_class} (transformers "
        f"{transformers.__version__}); without it every example of the row would attend to every other. Set "
        "train.segment_attention: false (packed batches then use the block-diagonal mask), or data.packing: false")


def _segment_mask(n: int, before: int, window: int | None, device) -> torch.Tensor | None:
    """(1, 1, n, before + n): every query sees the `before` keys of its ancestors, then its own causally, and with a
    sliding `window` only the latest `window` of those (itself included); None where that is plain causal."""
    if before == 0 and (window is None or window >= n):
        return None
    mask = torch.ones((n, before + n), dtype=torch.bool, device=device).tril(diagonal=before)
    if window is not None and window < before + n:
        mask &= torch.ones_like(mask).triu(diagonal=before - window + 1)
    return mask[None, None]


def _causal(n: int, device) -> torch.Tensor:
    return torch.ones((n, n), dtype=torch.bool, device=device).tril()[None, None]


def _attend(module, query, key, value, mask, dropout: float, scaling) -> torch.Tensor:
    """SDPA on one segment, (1, heads, n, head_dim) out. Grouped key/value heads go to the kernel as they are
    (`enable_gqa`), also under a mask, where transformers' wrapper would repeat them to every query head first."""
    groups = getattr(module, "num_key_value_groups", 1)
    if groups > 1 and not _SDPA_HAS_GQA:
        key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    extra = {"enable_gqa": True} if groups > 1 and _SDPA_HAS_GQA else {}
    return F.scaled_dot_product_attention(query, key, value, attn_mask=mask, dropout_p=dropout, scale=scaling,
                                          is_causal=mask is None, **extra)


def _eager_function(module):
    """The `eager_attention_forward` of the module's own modeling file (None where it has none)."""
    return getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None)


def _attend_eager(module, query, key, value, mask, dropout: float, scaling, kwargs) -> torch.Tensor:
    """The model's own eager attention on one segment (soft-capping and all), (1, n, heads, head_dim) out."""
    if mask is None:
        mask = _causal(query.shape[2], query.device)
    additive = torch.zeros(mask.shape, dtype=query.dtype, device=query.device).masked_fill(
        ~mask, torch.finfo(query.dtype).min)
    return _eager_function(module)(module, query, key, value, additive, dropout=dropout, scaling=scaling,
                                   **kwargs)[0]


def _window(module) -> int | None:
    """The sliding window of `module`'s layer, as the model's own masks have it."""
    config = module.config
    types = layer_types(config)
    layer_type = types[0] if len(set(types)) == 1 else types[module.layer_idx]
    return window_of(config, layer_type)


def _computed_dtype(query: torch.Tensor) -> torch.dtype:
    """The precision SDPA computes `query` in: CPU autocast casts SDPA's inputs to its dtype, so under bf16 autocast
    a query that RoPE has promoted to fp32 (fp32 cos/sin) is still attended in bf16."""
    if query.dtype == torch.float32 and torch.is_autocast_enabled("cpu"):
        return torch.get_autocast_dtype("cpu")
    return query.dtype


def _upcast(query: torch.Tensor, keys: int) -> bool:
    """Whether a CPU segment that would be attended in half precision runs in fp32 instead: float16 always, bf16
    where its backward is slower (kernels/attention_precision.py); fp32 only adds precision."""
    if query.device.type != "cpu":
        return False
    dtype = _computed_dtype(query)
    return dtype == torch.float16 or (dtype == torch.bfloat16 and not bf16_on_cpu(keys))


def _is_placeholder(mask, query) -> bool:
    """Whether `mask` is run_decoder's all-True (1, 1, 1, 1) mask, which no causal mask of several queries is."""
    return mask is not None and mask.dtype == torch.bool and tuple(mask.shape) == (1, 1, 1, 1) and query.shape[2] > 1


def _segment_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, **kwargs):
    return _segments(module, query, key, value, attention_mask, dropout, scaling, kwargs, eager=False)


def _segment_attention_eager(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None,
                             **kwargs):
    return _segments(module, query, key, value, attention_mask, dropout, scaling, kwargs, eager=True)


def _segments(module, query, key, value, attention_mask, dropout: float, scaling, kwargs: dict, eager: bool):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    layout = kwargs.pop(LAYOUT_KWARG, None)
    calls = None if torch.compiler.is_compiling() else _layout_calls.get()
    if layout is None and (calls is not None or _is_placeholder(attention_mask, query)):
        raise _layout_lost(type(module).__name__, "did not reach the attention function")
    if layout is None:
        inner = _eager_function(module) if eager else sdpa_attention_forward
        return inner(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    if calls is not None:
        calls.append(1)
    lengths, chains = layout
    if query.shape[0] != 1 or sum(lengths) != query.shape[2]:
        raise ValueError(f"segment attention: {len(lengths)} segments of {sum(lengths)} tokens do not tile "
                         f"a single row of {query.shape[2]}")
    low = _computed_dtype(query)
    window = _window(module)
    # split, not slicing: the backward of a split is one concatenation, of a slice a zero-filled full-size gradient
    qs, ks, vs = query.split(lengths, dim=2), key.split(lengths, dim=2), value.split(lengths, dim=2)
    outputs = []
    for s, chain in enumerate(chains):
        q, k, v = qs[s], ks[s], vs[s]
        if chain:
            k = torch.cat([ks[a] for a in chain] + [k], dim=2)
            v = torch.cat([vs[a] for a in chain] + [v], dim=2)
        mask = _segment_mask(lengths[s], k.shape[2] - lengths[s], window, query.device)
        if eager:
            outputs.append(_attend_eager(module, q, k, v, mask, dropout, scaling, kwargs).transpose(1, 2))
        elif _upcast(q, k.shape[2]):
            with torch.autocast("cpu", enabled=False):
                outputs.append(_attend(module, q.float(), k.float(), v.float(), mask, dropout, scaling).to(low))
        else:
            outputs.append(_attend(module, q, k, v, mask, dropout, scaling))
    return torch.cat(outputs, dim=2).transpose(1, 2), None


def _register() -> None:
    global _registered
    if _registered:
        return
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, eager_mask, sdpa_mask

    AttentionInterface.register(NAME, _segment_attention)
    AttentionMaskInterface.register(NAME, sdpa_mask)
    AttentionInterface.register(NAME_EAGER, _segment_attention_eager)
    AttentionMaskInterface.register(NAME_EAGER, eager_mask)
    _registered = True


_STANDS_IN_FOR = {"sdpa": NAME, "eager": NAME_EAGER}


def unsupported(model) -> str | None:
    """Why segment attention cannot stand in for `model`'s attention, or None where it can."""
    config = model.config
    implementation = getattr(config, "_attn_implementation", None)
    if getattr(config, "is_encoder_decoder", False):
        return "an encoder-decoder model"
    if implementation not in (*_STANDS_IN_FOR, NAME, NAME_EAGER):
        return f"its attention implementation is {implementation!r}, not sdpa or eager"
    unknown = unknown_layer_types(config)
    if unknown:
        return f"layers of type {', '.join(sorted(unknown))}, whose masks it does not build"
    if implementation in ("eager", NAME_EAGER):
        if _eager_function(model.get_decoder()) is None:
            return "its eager attention is not transformers' eager_attention_forward"
    return None


def enable(model) -> Patch:
    """Switch `model` to segment attention where it can stand in for the model's attention (else a changed count
    of 0 and the reason); unpatching puts the implementation it stood in for back."""
    reason = unsupported(model)
    if reason is not None:
        return Patch(0, reason=reason)
    original = model.config._attn_implementation
    if original in _STANDS_IN_FOR:
        _register()
        model.set_attn_implementation(_STANDS_IN_FOR[original])
        if not active(model):  # transformers declined (it logs why)
            return Patch(0, reason="its attention implementation cannot be set after loading (it does not go "
                                   "through transformers' attention interface)")
    else:  # already enabled
        original = next(k for k, v in _STANDS_IN_FOR.items() if v == original)
    return Patch(1, lambda: model.set_attn_implementation(original))


def active(model) -> bool:
    return getattr(model.config, "_attn_implementation", None) in (NAME, NAME_EAGER)


def _chains(plan: list[list[int]]) -> list[list[int]]:
    """For each segment of the plan, its ancestor segments, the root first."""
    chains: list[list[int]] = []
    for _, _, parent in plan:
        chains.append([] if parent < 0 else chains[parent] + [parent])
    return chains


def run_decoder(model, batch: dict[str, torch.Tensor], compiled: bool = False) -> torch.Tensor:
    """The decoder's last hidden states (B, L, H) for a packed batch, computed on its one padding-free row
    (data/shared_prefixes.py) in which shared leading tokens appear once.

    Pad positions get zeros; every consumer reads only the positions that hold tokens. `compiled`: the decoder
    layers are compiled (train.compile), whose attention calls cannot be counted."""
    keep = batch["segments"] >= 0
    plan = batch["segment_plan"].tolist()
    layout = ([length for _, length, _ in plan], _chains(plan))
    marker = torch.ones((1, 1, 1, 1), dtype=torch.bool, device=keep.device)  # a 4D mask skips mask building
    calls: list = []
    token = _layout_calls.set(calls)
    try:
        hidden = model.get_decoder()(
            input_ids=batch["decoder_ids"][None],
            position_ids=batch["decoder_positions"][None],
            attention_mask=marker,
            use_cache=False,
            **{LAYOUT_KWARG: layout},
        ).last_hidden_state[0]
    finally:
        _layout_calls.reset(token)
    if not calls and not compiled:
        raise _layout_lost(type(model).__name__, "reached no attention layer")
    out = hidden.new_zeros((*keep.shape, hidden.shape[-1]))
    out[keep] = hidden[batch["decoder_gather"]]
    return out
