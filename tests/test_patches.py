"""Every speed patch can be undone (kernels/patches.py, kernels/apply.py `unpatch`), and kernels, methods and
objectives recognise a plain linear map by one predicate, so a new stand-in for nn.Linear keeps every fast path."""

import pytest
import torch
from conftest import tiny_llama
from torch import nn

from tunesmith.config import LoraSettings, TrainSettings
from tunesmith.context import RunContext
from tunesmith.kernels import onednn_linear
from tunesmith.kernels.apply import apply_speed_options, unpatch
from tunesmith.kernels.frozen_bf16 import FrozenBf16Linear
from tunesmith.kernels.patches import PlainLinear, is_plain_linear
from tunesmith.methods import lora, lora_function
from tunesmith.objectives.lm import _chunkable_head

EVERY_PATCH = dict(segment_attention=True, fused_norm=True, onednn_linear=True, loss_chunk=64,
                   activation_checkpointing=True, compile=True)


def _lora_model():
    model = tiny_llama(vocab_size=300)
    model.config.tie_word_embeddings = False
    model.lm_head.weight = nn.Parameter(model.lm_head.weight.detach().clone())
    lora.apply(model, LoraSettings(r=4, alpha=8, target_modules=["q_proj", "v_proj"]))
    return model


def _state(model) -> dict:
    return {"classes": {name: type(m) for name, m in model.named_modules()},
            "attention": model.config._attn_implementation,
            "checkpointing": getattr(model, "is_activation_checkpointing", None) or model.is_gradient_checkpointing,
            "compiled": [layer._compiled_call_impl for layer in model.model.layers[1:]]}


@pytest.mark.parametrize("bf16", [False, True])
def test_unpatching_every_patch_gives_back_the_plain_model(bf16):
    model = _lora_model()
    ids = torch.randint(3, 300, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        plain_logits = model(ids).logits
    weights = {name: p.detach().clone() for name, p in model.named_parameters()}
    before = _state(model)

    ctx = apply_speed_options(model, TrainSettings(bf16=bf16, **EVERY_PATCH), RunContext())
    applied = [setting for setting, patch in ctx.patches if patch]
    expected = ["train.segment_attention", "train.fused_norm", "train.onednn_linear", "train.loss_chunk",
                "train.activation_checkpointing", "train.compile"]
    assert applied == (["train.bf16_frozen_weights"] if bf16 else []) + expected[:2] + \
        (expected[2:3] if onednn_linear.available() else []) + expected[3:]
    patched = _state(model)
    assert (FrozenBf16Linear in patched["classes"].values()) == bf16
    assert patched["classes"] != before["classes"] and patched["attention"] != before["attention"]
    assert patched["checkpointing"] and all(patched["compiled"]) and ctx.loss_chunk == 64 and ctx.compiled

    recorded = [setting for setting, _ in ctx.patches]
    assert unpatch(ctx) == recorded[::-1]
    assert _state(model) == before
    assert (ctx.loss_chunk, ctx.onednn, ctx.compiled, ctx.patches) == (None, False, False, [])
    for name, p in model.named_parameters():
        assert p.dtype == torch.float32, name
        # bf16 storage rounds a frozen weight once; unpatched, it keeps that rounding (and nothing else changes)
        module, _, kind = name.rpartition(".")
        stored_bf16 = patched["classes"][module] is FrozenBf16Linear and kind == "weight"
        rounded = weights[name].to(torch.bfloat16).float() if stored_bf16 else weights[name]
        assert torch.equal(p, rounded), name
    with torch.no_grad():
        logits = model(ids).logits
    if bf16:
        assert (logits - plain_logits).abs().max() < 0.05 * plain_logits.abs().max()
    else:
        assert torch.equal(logits, plain_logits)


class RowMajorLinear(PlainLinear):
    """A new stand-in for nn.Linear, as a future kernel would add one: the same product."""


class LoggingLinear(nn.Linear):
    """A subclass from elsewhere whose forward does more: not plain."""

    def forward(self, x):
        return super().forward(x) + 1


def test_one_predicate_recognises_every_plain_linear_and_the_fast_paths_follow_it():
    assert is_plain_linear(nn.Linear(4, 4)) and is_plain_linear(RowMajorLinear(4, 4))
    assert is_plain_linear(FrozenBf16Linear(4, 4)) and is_plain_linear(onednn_linear.OneDNNLinear(4, 4))
    assert not is_plain_linear(LoggingLinear(4, 4)) and not is_plain_linear(nn.Embedding(4, 4))

    model = _lora_model()
    ctx = RunContext(loss_chunk=64)
    model.lm_head.__class__ = RowMajorLinear
    assert _chunkable_head(model, ctx) is model.lm_head  # chunked cross-entropy kept for the new stand-in
    model.lm_head.__class__ = LoggingLinear
    assert _chunkable_head(model, ctx) is None  # full logits through its own forward

    layer = model.model.layers[0].self_attn.q_proj
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    x = torch.randn(3, 64)
    layer.base_layer.__class__ = RowMajorLinear
    assert lora_function.applies(x, layer.base_layer, a, b)  # the fused LoRA node kept
    layer.base_layer.__class__ = LoggingLinear
    assert not lora_function.applies(x, layer.base_layer, a, b)
