"""Fused RMSNorm gives the model's own norm's values, forward and backward, and steps aside where it cannot."""

import copy
import importlib

import pytest
import torch
from conftest import tiny_llama

from tunesmith.kernels import fused_norm

MODULES = {"LlamaRMSNorm": "llama", "MistralRMSNorm": "mistral", "MixtralRMSNorm": "mixtral", "Qwen2RMSNorm": "qwen2",
           "Qwen2MoeRMSNorm": "qwen2_moe", "Qwen3RMSNorm": "qwen3", "Phi3RMSNorm": "phi3",
           "SmolLM3RMSNorm": "smollm3", "GraniteRMSNorm": "granite", "GemmaRMSNorm": "gemma",
           "Gemma2RMSNorm": "gemma2", "Gemma3RMSNorm": "gemma3"}
OFFSET = {"GemmaRMSNorm", "Gemma2RMSNorm", "Gemma3RMSNorm"}  # scale by 1 + weight


def _values_and_grad(norm, x, upstream):
    x = x.clone().requires_grad_(True)
    out = norm(x)
    out.backward(upstream)
    return out.detach(), x.grad


@pytest.mark.parametrize("name", sorted(MODULES))
def test_fused_forward_and_backward_equal_each_rmsnorm_found_by_its_forward(name):
    cls = getattr(importlib.import_module(f"transformers.models.{MODULES[name]}.modeling_{MODULES[name]}"), name)
    g = torch.Generator().manual_seed(0)
    norm = cls(64, eps=1e-5)
    norm.weight.data = torch.rand(64, generator=g) + 0.5
    x, upstream = torch.randn(3, 7, 64, generator=g) * 3, torch.randn(3, 7, 64, generator=g)
    reference = _values_and_grad(norm, x, upstream)
    holder = torch.nn.Sequential(norm)
    assert fused_norm.enable(holder).changed == 1 and type(norm).__name__ == f"Fused{name}"
    assert norm.fused_scaling == (fused_norm.OFFSET if name in OFFSET else fused_norm.PLAIN)
    fused = _values_and_grad(norm, x, upstream)
    torch.testing.assert_close(fused[0], reference[0], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(fused[1], reference[1], atol=1e-6, rtol=1e-6)


def test_model_logits_unchanged_copies_keep_it_and_bf16_falls_back():
    model = tiny_llama(vocab_size=300)
    ids = torch.randint(3, 300, (2, 12), generator=torch.Generator().manual_seed(1))
    before = model(input_ids=ids).logits
    assert fused_norm.enable(model).changed == 2 * model.config.num_hidden_layers + 1
    assert fused_norm.enable(model).changed == 0  # already fused
    torch.testing.assert_close(model(input_ids=ids).logits, before, atol=1e-6, rtol=1e-6)
    twin = copy.deepcopy(model)
    torch.testing.assert_close(twin(input_ids=ids).logits, before, atol=1e-6, rtol=1e-6)
    norm = model.model.norm
    x = torch.randn(2, 5, norm.weight.shape[0]).bfloat16()
    assert torch.equal(norm(x), norm.unfused_forward(x))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = torch.randn(2, 5, norm.weight.shape[0])
        assert torch.equal(norm(y), norm.unfused_forward(y))


class MeanFreeNorm(torch.nn.Module):
    """Shaped like an RMSNorm (a weight, `eps`, no bias), but it subtracts the mean first: not what F.rms_norm does."""

    def __init__(self, dim: int):
        super().__init__()
        self.weight, self.eps = torch.nn.Parameter(torch.ones(dim)), 1e-6

    def forward(self, x):
        x = x - x.mean(-1, keepdim=True)
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


def test_a_norm_whose_forward_differs_keeps_it_and_the_patch_says_why():
    model = torch.nn.Sequential(MeanFreeNorm(16), torch.nn.LayerNorm(16, bias=False), torch.nn.LayerNorm(16))
    patch = fused_norm.enable(model)
    assert not patch and [type(m) for m in model] == [MeanFreeNorm, torch.nn.LayerNorm, torch.nn.LayerNorm]
    assert patch.reason == "no RMSNorm computes what F.rms_norm does (norms: LayerNorm, MeanFreeNorm)"


@pytest.mark.parametrize("offset", [False, True])
def test_the_norm_node_and_its_backward_equal_a_float64_reference(offset):
    from tunesmith.kernels.rms_norm_function import rms_norm

    g = torch.Generator().manual_seed(1)
    x, upstream = torch.randn(3, 7, 64, generator=g) * 3, torch.randn(3, 7, 64, generator=g)
    weight = torch.rand(64, generator=g) + 0.5

    def run(x, w, reference: bool):
        x, w = x.clone().requires_grad_(), w.clone().requires_grad_()
        if reference:
            out = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * ((1 + w) if offset else w)
        else:
            out = rms_norm(x, w, 1e-5, offset)
        out.backward(upstream.to(out.dtype))
        return out.detach(), x.grad, w.grad

    ours, exact = run(x, weight, False), run(x.double(), weight.double(), True)
    for a, b in zip(ours, exact, strict=True):
        torch.testing.assert_close(a, b.float(), atol=2e-5, rtol=1e-5)


def test_under_bf16_autocast_the_norms_only_linears_read_emit_bf16_once_and_the_rest_stay_fp32():
    model = tiny_llama(vocab_size=128)
    layer = model.model.layers[0]
    x = torch.randn(1, 9, 64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        plain_pre, plain_final = layer.input_layernorm(x), model.model.norm(x)
    assert fused_norm.enable(model).changed == 5
    with torch.autocast("cpu", dtype=torch.bfloat16):
        pre, final = layer.input_layernorm(x), model.model.norm(x)
    assert pre.dtype == torch.bfloat16 and plain_pre.dtype == torch.float32
    # what every consumer's autocast cast the fp32 output to, up to one bf16 rounding step
    torch.testing.assert_close(pre, plain_pre.to(torch.bfloat16), atol=0, rtol=2 ** -7)
    assert final.dtype == torch.float32 and torch.equal(final, plain_final)  # the final norm feeds the loss code

    class PostNormLayer(torch.nn.Module):  # Gemma 2 / OLMo 2: a norm's output is added to the fp32 residual
        def __init__(self):
            super().__init__()
            norm = copy.deepcopy(layer.input_layernorm)
            self.input_layernorm, self.post_attention_layernorm = norm, copy.deepcopy(norm)
            self.post_feedforward_layernorm = copy.deepcopy(norm)

    assert not fused_norm._pre_norms(PostNormLayer()) and len(fused_norm._pre_norms(model)) == 4


def test_a_bf16_layer_with_the_fused_norms_has_the_plain_layers_gradient_within_bf16_rounding():
    """The consumers' input gradients are now summed in bf16 (the casts summed them in fp32): bounded here."""
    model = tiny_llama(vocab_size=128)
    layer = model.model.layers[0]
    g = torch.Generator().manual_seed(2)
    x, upstream = torch.randn(1, 9, 64, generator=g), torch.randn(1, 9, 64, generator=g)
    position = torch.arange(9)[None]
    rope = model.model.rotary_emb(x, position)

    def grad_of_input():
        leaf = x.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = layer(leaf, position_embeddings=rope, attention_mask=None, position_ids=position)
        (out[0] if isinstance(out, tuple) else out).backward(upstream)
        return leaf.grad

    plain = grad_of_input()
    fused_norm.enable(model)
    fused = grad_of_input()
    assert (fused - plain).norm() / plain.norm() < 1e-3  # measured 2.8e-5
