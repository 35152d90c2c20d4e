"""Prefix tuning and P-tuning v2: per-layer key/value prefixes in a DynamicCache, grouped-query attention,
generation through the cache, PEFT's format both ways, the real model."""

import pytest
import torch
from conftest import tiny_llama
from test_prompt import (chat_generation_matches, generation_matches, ids_batch, lively, logits, only_virtual_trains,
                         packed_equals_alone, real_model_drop, unpacked)

from tunesmith.config.methods import PrefixSettings, PtuningV2Settings
from tunesmith.errors import ModelError
from tunesmith.methods import prefix

PTUNING = PtuningV2Settings(num_virtual_tokens=5)
PROJECTED = PrefixSettings(num_virtual_tokens=5, projection_hidden=16)
BOTH = pytest.mark.parametrize("settings", [PTUNING, PROJECTED], ids=["ptuning-v2", "prefix"])


def other_llama(**changes):
    """tiny_llama's config with some fields changed (and lively weights)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    fields = tiny_llama(vocab_size=300).config.to_dict() | changes
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**fields)).eval()
    return lively(model)


def test_dispatch_on_the_method_name():
    for settings, kind in [(PTUNING, prefix.DirectPrefix), (PROJECTED, prefix.ProjectedPrefix),
                           (PrefixSettings(num_virtual_tokens=5, projection=False), prefix.DirectPrefix)]:
        model = tiny_llama(vocab_size=300)
        assert type(prefix.apply(model, settings)) is kind


def test_grouped_query_attention_shapes():
    model = tiny_llama(vocab_size=300)  # 4 query heads of 16, 2 key/value heads
    assert prefix.kv_shape(model) == (2, 2, 16)
    virtual = prefix.apply(model, PTUNING)
    assert virtual.flat().shape == (5, 2 * 2 * 2 * 16)
    cache = virtual.cache(model, 3)
    assert len(cache.layers) == 2 and cache.get_seq_length() == 5
    assert cache.layers[1].keys.shape == cache.layers[1].values.shape == (3, 2, 5, 16)
    # PEFT's layout: per token, [layer 0 key, layer 0 value, layer 1 key, layer 1 value], each (heads, head_dim)
    row = virtual.flat()[4].view(4, 2, 16)
    torch.testing.assert_close(cache.layers[1].keys[2, :, 4], row[2], atol=0, rtol=0)
    torch.testing.assert_close(cache.layers[1].values[0, :, 4], row[3], atol=0, rtol=0)


@BOTH
def test_only_the_prefix_trains(settings):
    model = tiny_llama(vocab_size=300)
    prefix.apply(model, settings)
    if settings is PTUNING:
        only_virtual_trains(model, ["virtual_tokens.prefix"])
    else:
        only_virtual_trains(model, ["virtual_tokens.embedding"] + [f"virtual_tokens.mlp.{i}.{w}"
                                                                     for i in (0, 2) for w in ("weight", "bias")])


def test_the_initial_prefix_is_the_models_own_keys_and_values():
    model = tiny_llama(vocab_size=300)
    torch.manual_seed(4)
    virtual = prefix.apply(model, PTUNING)
    torch.manual_seed(4)
    ids = torch.randint(0, 300, (1, 5))
    with torch.no_grad():
        out = model(ids, use_cache=True)
        ours = virtual.cache(model, 1)
    for layer, theirs in enumerate(out.past_key_values.layers):
        torch.testing.assert_close(ours.layers[layer].keys, theirs.keys, atol=1e-6, rtol=0)
        torch.testing.assert_close(ours.layers[layer].values, theirs.values, atol=1e-6, rtol=0)


@BOTH
def test_packed_rows_and_padding_equal_each_example_alone(settings):
    model = lively(tiny_llama(vocab_size=300))
    prefix.apply(model, settings)
    packed_equals_alone(model)


def test_eager_attention_agrees_with_sdpa():
    model = lively(tiny_llama(vocab_size=300))
    prefix.apply(model, PTUNING)
    packed_equals_alone(model)
    with torch.no_grad():
        sdpa = logits(model, unpacked(ids_batch()))
        model.config._attn_implementation = "eager"
        packed_equals_alone(model)
        torch.testing.assert_close(logits(model, unpacked(ids_batch())), sdpa, atol=1e-5, rtol=0)


def test_hidden_states_equal_the_model_continuing_from_the_prefix_cache():
    """The training forward is the plain HF forward with the prefix as past key values (what PEFT does)."""
    model = lively(tiny_llama(vocab_size=300))
    virtual = prefix.apply(model, PTUNING)
    ids = ids_batch()
    with torch.no_grad():
        expected = model(input_ids=ids, past_key_values=virtual.cache(model, 2), use_cache=True).logits
        torch.testing.assert_close(logits(model, unpacked(ids)), expected, atol=1e-5, rtol=0)


@BOTH
def test_greedy_generation_with_the_cache_equals_the_training_forward(settings):
    from test_prompt import examples, greedy_with_cache

    model = lively(tiny_llama(vocab_size=300))
    prefix.apply(model, settings)
    generation_matches(model)
    ids = examples([6])[0].input_ids
    plain = model.generate(input_ids=torch.tensor([ids]), max_new_tokens=8, do_sample=False, pad_token_id=2)
    assert plain[0, len(ids):].tolist() != greedy_with_cache(model, ids, 8)


def test_generate_chat_uses_the_prefix(tiny_model_dir, tokenizer):
    from tunesmith.models import load_model

    model = lively(load_model(str(tiny_model_dir)))
    prefix.apply(model, PTUNING)
    chat_generation_matches(model, tokenizer)


@BOTH
def test_save_folds_the_projection_and_load_gives_equal_logits(tmp_path, settings):
    ours = lively(tiny_llama(vocab_size=300))
    prefix.apply(ours, settings)
    prefix.save(ours, settings, tmp_path / "a", "tiny")
    again = lively(tiny_llama(vocab_size=300))
    assert prefix.load(again, tmp_path / "a") == PTUNING
    assert isinstance(prefix.virtual_tokens(again), prefix.DirectPrefix)
    with torch.no_grad():
        torch.testing.assert_close(logits(again, unpacked(ids_batch())), logits(ours, unpacked(ids_batch())),
                                   atol=1e-6, rtol=0)
    assert [n for n, p in again.named_parameters() if p.requires_grad] == ["virtual_tokens.prefix"]


@pytest.mark.parametrize("changes", [{}, {"num_key_value_heads": 1, "head_dim": 24}], ids=["gqa", "head_dim"])
@BOTH
def test_peft_loads_our_adapter(tmp_path, settings, changes):
    """PEFT's prefix-tuning logits cover the real positions only."""
    from peft import PeftModel

    ours = other_llama(**changes)
    prefix.apply(ours, settings)
    prefix.save(ours, settings, tmp_path / "ours", "tiny")
    theirs = PeftModel.from_pretrained(other_llama(**changes), str(tmp_path / "ours")).eval()
    ids = ids_batch()
    with torch.no_grad():
        expected = logits(ours, unpacked(ids))
        got = theirs(input_ids=ids).logits
        assert got.shape[1] == ids.shape[1]
        assert (expected - other_llama(**changes)(ids).logits).abs().max() > 1e-2
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("projection", [False, True], ids=["direct", "projection"])
def test_we_load_a_peft_adapter(tmp_path, projection):
    from peft import PrefixTuningConfig, get_peft_model

    config = PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=6, prefix_projection=projection,
                                encoder_hidden_size=24)
    peft_model = get_peft_model(lively(tiny_llama(vocab_size=300)), config).eval()
    assert (config.token_dim, config.num_attention_heads) == (32, 2)  # rewritten by PEFT for the 2 key/value heads
    ids = ids_batch()
    with torch.no_grad():
        expected = peft_model(input_ids=ids).logits
    peft_model.save_pretrained(str(tmp_path / "theirs"))
    ours = lively(tiny_llama(vocab_size=300))
    assert prefix.load(ours, tmp_path / "theirs") == PtuningV2Settings(num_virtual_tokens=6)
    with torch.no_grad():
        torch.testing.assert_close(logits(ours, unpacked(ids)), expected, atol=1e-5, rtol=0)


def test_adapter_for_another_width_is_refused(tmp_path):
    ours = tiny_llama(vocab_size=300)
    prefix.apply(ours, PTUNING)
    prefix.save(ours, PTUNING, tmp_path / "a", "tiny")
    with pytest.raises(ModelError, match=r"key/value width \(token_dim\) 32; model has 2 and 16 \(1 heads × 16\)"):
        prefix.load(other_llama(hidden_size=32, head_dim=16, num_attention_heads=2, num_key_value_heads=1),
                    tmp_path / "a")
    (tmp_path / "a" / "adapter_config.json").write_text(
        (tmp_path / "a" / "adapter_config.json").read_text().replace('"num_virtual_tokens": 5', '"num_virtual_tokens": 4'))
    with pytest.raises(ModelError, match=r"prompt_embeddings: adapter has \(5, 128\), model expects \(4, 128\)"):
        prefix.load(tiny_llama(vocab_size=300), tmp_path / "a")


@pytest.mark.slow
# measured (2026-12-07, AMD EPYC fam 25), 10 steps: ptuning-v2 4.5663 → 4.1842 (8.4 %), prefix 4.8759 → 4.1066
# (15.8 %); 12 steps: 9.4 % and 16.0 %
@pytest.mark.parametrize("name, lr, margin", [("ptuning-v2", "1e-2", 0.04), ("prefix", "1e-3", 0.07)])
def test_real_model_prefix_lowers_heldout_loss(tmp_path, name, lr, margin):
    before, after = real_model_drop(tmp_path, [f"method.name={name}", "method.num_virtual_tokens=16",
                                               "train.max_steps=10", f"train.lr={lr}"])
    drop = (before - after) / before
    print(f"{name}: held-out loss {before:.4f} -> {after:.4f} ({drop:.1%})")
    assert drop >= margin, f"held-out loss {before:.4f} → {after:.4f} ({drop:.1%})"
