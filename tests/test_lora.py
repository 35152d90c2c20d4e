import math

import pytest
import torch
from conftest import tiny_llama
from torch import nn

from tunesmith.config import LoraSettings
from tunesmith.errors import ConfigError
from tunesmith.methods import lora
from tunesmith.methods.base import count_parameters


def _randomize_b(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    for layer in lora.lora_layers(model).values():
        for b in layer.lora_B.values():
            b.weight.data = torch.randn(b.weight.shape, generator=g) * 0.05


def test_forward_equals_hand_computed():
    torch.manual_seed(0)
    base = nn.Linear(12, 10)
    layer = lora.LoraLinear(base)
    layer.add_adapter("default", r=3, alpha=6.0, dropout=0.0, rslora=False)
    layer.lora_B["default"].weight.data.normal_()
    x = torch.randn(5, 12)
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    expected = x @ base.weight.T + base.bias + (6.0 / 3) * (x @ a.T @ b.T)
    torch.testing.assert_close(layer(x), expected, atol=1e-6, rtol=1e-6)


def test_rslora_scaling():
    assert lora.lora_scaling(16, 32, rslora=True) == pytest.approx(32 / math.sqrt(16))
    assert lora.lora_scaling(16, 32, rslora=False) == pytest.approx(2.0)


def test_untrained_equals_base_and_only_lora_trains():
    model = tiny_llama(vocab_size=300)
    ids = torch.randint(0, 300, (2, 17))
    reference = model(ids).logits
    lora.apply(model, LoraSettings(r=4, alpha=8))
    assert torch.equal(model(ids).logits, reference)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    # 2 layers × 7 linears, each r·(in+out)
    h, i, kv = 64, 128, 32
    shapes = [(h, h), (h, kv), (h, kv), (h, h), (h, i), (h, i), (i, h)]
    expected = 2 * sum(4 * (a + b) for a, b in shapes)
    assert count_parameters(model)[0] == expected


def test_merge_equals_unmerged_and_unmerge_restores_base():
    model = tiny_llama(vocab_size=300)
    ids = torch.randint(0, 300, (2, 17))
    base_logits = model(ids).logits
    base_weight = model.model.layers[0].self_attn.q_proj.weight.clone()
    lora.apply(model, LoraSettings(r=4, alpha=8, dropout=0.0))
    _randomize_b(model)
    unmerged = model(ids).logits
    assert (unmerged - base_logits).abs().max() > 1e-3  # the adapter does something
    lora.merge(model)
    torch.testing.assert_close(model(ids).logits, unmerged, atol=1e-5, rtol=0)
    lora.unmerge(model)
    torch.testing.assert_close(model(ids).logits, unmerged, atol=1e-5, rtol=0)
    lora.set_active(model, None)  # unmerged and disabled: the bare base model again
    torch.testing.assert_close(model(ids).logits, base_logits, atol=1e-5, rtol=0)
    torch.testing.assert_close(model.model.layers[0].self_attn.q_proj.base_layer.weight, base_weight, atol=1e-6, rtol=0)


def test_unload_after_merge_gives_plain_linears():
    model = tiny_llama(vocab_size=300)
    ids = torch.randint(0, 300, (1, 9))
    lora.apply(model, LoraSettings(r=2, alpha=4, dropout=0.0))
    _randomize_b(model)
    with_adapter = model(ids).logits
    lora.merge(model)
    lora.unload(model)
    assert not lora.lora_layers(model)
    assert isinstance(model.model.layers[1].mlp.down_proj, nn.Linear)
    torch.testing.assert_close(model(ids).logits, with_adapter, atol=1e-5, rtol=0)


def test_save_load_round_trip(tmp_path):
    model = tiny_llama(vocab_size=300)
    ids = torch.randint(0, 300, (2, 11))
    settings = LoraSettings(r=4, alpha=8, dropout=0.0, target_modules=["q_proj", "v_proj"], rslora=True)
    lora.apply(model, settings)
    _randomize_b(model)
    expected = model(ids).logits
    lora.save(model, settings, tmp_path / "adapter", "tiny")
    fresh = tiny_llama(vocab_size=300)
    loaded = lora.load(fresh, tmp_path / "adapter")
    assert loaded.rslora and loaded.r == 4
    torch.testing.assert_close(fresh(ids).logits, expected, atol=1e-6, rtol=0)


def test_target_that_matches_nothing_lists_layers():
    model = tiny_llama(vocab_size=300)
    with pytest.raises(ConfigError, match="matches no layer.*q_proj"):
        lora.apply(model, LoraSettings(target_modules=["query_key_value"]))


def test_adapter_for_another_base_names_shapes(tmp_path):
    model = tiny_llama(vocab_size=300)
    settings = LoraSettings(r=4, alpha=8)
    lora.apply(model, settings)
    lora.save(model, settings, tmp_path / "adapter", "tiny")
    from transformers import LlamaConfig, LlamaForCausalLM

    other = LlamaForCausalLM(LlamaConfig(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2))
    from tunesmith.errors import ModelError

    with pytest.raises(ModelError, match=r"adapter has \(4, 64\), model expects \(4, 32\)"):
        lora.load(other, tmp_path / "adapter")


def test_reusing_an_adapter_name_says_it_is_taken_and_changes_nothing():
    from tunesmith.errors import ModelError

    model = tiny_llama(vocab_size=300)
    lora.apply(model, LoraSettings(r=4))
    params = {n: p.clone() for n, p in model.named_parameters()}
    with pytest.raises(ModelError) as e:
        lora.apply(model, LoraSettings(r=8))
    message = str(e.value)
    assert "adapter name 'default' is already taken" in message and "--adapter NAME=PATH" in message
    assert "adapter_name=" in message and "torch.nn.Module attribute" not in message  # before: "not allowed"
    assert {n: p for n, p in model.named_parameters()}.keys() == params.keys()  # no half-added adapter
    lora.apply(model, LoraSettings(r=8), adapter_name="second")  # another name works
    assert {"default", "second"} <= set(next(iter(lora.lora_layers(model).values())).lora_A)
