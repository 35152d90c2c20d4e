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
