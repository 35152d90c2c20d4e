"""Attention over one padding-free row of several examples, each attending causally to itself only.

A packed batch (data/packing.py) is rows of whole examples with a block-diagonal mask, and the row ends are padding.
When the model's attention goes through transformers' attention interface (SDPA, no sliding window, no logit
soft-capping), `hidden_states` instead drops every pad token, runs the decoder on one row laid out by
data/shared_prefixes.py, and this attention function runs SDPA on each segment of that row: a segment with no
ancestor uses the causal kernel on its own slice; a segment that continues a shared prefix attends to its ancestors'
keys and values and then causally to itself. No padding is computed, and no attention score is formed between
different examples. The outputs are those of the block-diagonal mask; only the floating-point order differs.

`enable(model)` switches a loaded model to the registered implementation. Without a segment layout in the call, it
is plain SDPA with the usual masks, so generation, padded batches and virtual-token methods run as before. The
layout travels as a keyword argument through the model's forward, which another model class or transformers version
may drop or never hand to this function; the row's placeholder mask would then let every token attend to every
other, so `run_decoder` raises `SegmentAttentionError` instead (train.segment_attention: false avoids it).
"""

from __future__ import annotations

from contextvars import ContextVar

import torch
import torch.nn.functional as F
from torch.torch_version import TorchVersion

from tunesmith.errors import ModelError
from tunesmith.kernels.attention_precision import bf16_on_cpu
from tunesmith.kernels.patches import Patch

NAME = "tunesmith_segments"
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


def _prefix_causal_mask(n: int, before: int, device) -> torch.Tensor:
    """(1, 1, n, before + n): every query sees the `before` keys of its ancestors, then its own causally."""
    return torch.ones((n, before + n), dtype=torch.bool, device=device).tril(diagonal=before)[None, None]


def _attend(module, query, key, value, mask, dropout: float, scaling) -> torch.Tensor:
    """SDPA on one segment, (1, heads, n, head_dim) out. Grouped key/value heads go to the kernel as they are
    (`enable_gqa`), also under a mask, where transformers' wrapper would repeat them to every query head first."""
    groups = getattr(module, "num_key_value_groups", 1)
    if groups > 1 and not _SDPA_HAS_GQA:
        key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    extra = {"enable_gqa": True} if groups > 1 and _SDPA_HAS_GQA else {}
    return F.scaled_dot_product_attention(query, key, value, attn_mask=mask, dropout_p=dropout, scale=scaling,
                                          is_causal=mask is None, **extra)


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
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    layout = kwargs.pop(LAYOUT_KWARG, None)
    calls = None if torch.compiler.is_compiling() else _layout_calls.get()
    if layout is None and (calls is not None or _is_placeholder(attention_mask, query)):
        raise _layout_lost(type(module).__name__, "did not reach the attention function")
    if layout is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    if calls is not None:
        calls.append(1)
    lengths, chains = layout
    if query.shape[0] != 1 or sum(lengths) != query.shape[2]:
        raise ValueError(f"segment attention: {len(lengths)} segments of {sum(lengths)} tokens do not tile "
                         f"a single row of {query.shape[2]}")
    low = _computed_dtype(query)
    # split, not slicing: the backward of a split is one concatenation, of a slice a zero-filled full-size gradient
    qs, ks, vs = query.split(lengths, dim=2), key.split(lengths, dim=2), value.split(lengths, dim=2)
    outputs = []
    for s, chain in enumerate(chains):
        q, k, v, mask = qs[s], ks[s], vs[s], None
        if chain:
            k = torch.cat([ks[a] for a in chain] + [k], dim=2)
            v = torch.cat([vs[a] for a in chain] + [v], dim=2)
            mask = _prefix_causal_mask(lengths[s], k.shape[2] - lengths[s], query.device)
        if _upcast(q, k.shape[2]):
            with torch.autocast("cpu", enabled=False):
                out = _attend(module, q.float(), k.float(), v.float(), mask, dropout, scaling).to(low)
        else:
            out = _attend(module, q, k, v, mask, dropout, scaling)
        outputs.append(out)
    return torch.cat(outputs, dim=2).transpose(1, 2), None


def _register() -> None:
    global _registered
    if _registered:
        return
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(NAME, _segment_attention)
    AttentionMaskInterface.register(NAME, sdpa_mask)
    _registered = True


def supported(model) -> bool:
    """Whether every attention layer of `model` is plain causal SDPA that segment attention can stand in for."""
    config = model.config
    if getattr(config, "_attn_implementation", None) not in ("sdpa", NAME):
        return False
    if any(t != "full_attention" for t in (getattr(config, "layer_types", None) or [])):
        return False
    if getattr(config, "use_sliding_window", False) or getattr(config, "attn_logit_softcapping", None):
        return False
    return not getattr(config, "is_encoder_decoder", False)


def enable(model) -> Patch:
    """Switch `model` to segment attention where supported (a changed count of 0 where not); unpatching puts SDPA,
    the one implementation it stands in for, back."""
    if not supported(model):
        return Patch(0)
    if model.config._attn_implementation != NAME:
        _register()
        model.set_attn_implementation(NAME)
    return Patch(1, lambda: model.set_attn_implementation("sdpa"))


def active(model) -> bool:
    return getattr(model.config, "_attn_implementation", None) == NAME


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
