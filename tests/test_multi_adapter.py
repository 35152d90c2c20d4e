"""Several named LoRA adapters in one base: switch per call, disable, delete, combine; memory = base + adapters."""

import pytest
import torch
from conftest import tiny_llama

from tunesmith.config.methods import LoraSettings
from tunesmith.errors import ModelError
from tunesmith.infer.adapters import load_with_adapter
from tunesmith.methods import lora
from tunesmith.methods.base import count_parameters

IDS = torch.randint(0, 300, (2, 9), generator=torch.Generator().manual_seed(0))


def _adapter(folder, base_dir, seed, r=4, targets=("q_proj", "v_proj", "down_proj")):
    model = tiny_llama(vocab_size=300)
    settings = LoraSettings(r=r, alpha=2 * r, dropout=0.0, target_modules=list(targets))
    lora.apply(model, settings)
    g = torch.Generator().manual_seed(seed)
    for layer in lora.lora_layers(model).values():
        layer.lora_B["default"].weight.data = torch.randn(layer.lora_B["default"].weight.shape, generator=g) * 0.1
    lora.save(model, settings, folder, str(base_dir))
    return model


@pytest.fixture
def two_adapters(tmp_path, tokenizer):
    base_dir = tmp_path / "base"
    tiny_llama(vocab_size=300).save_pretrained(base_dir)
    tokenizer.save_pretrained(base_dir)
    a = _adapter(tmp_path / "a", base_dir, seed=1)
    b = _adapter(tmp_path / "b", base_dir, seed=2, r=2)
    return base_dir, a, b, tmp_path


def _registry(base_dir, tmp_path):
    model = tiny_llama(vocab_size=300)
    lora.load(model, tmp_path / "a", "a")
    lora.load(model, tmp_path / "b", "b")
    return model


def test_switching_adapters_per_call_and_disabling(two_adapters):
    base_dir, a, b, tmp_path = two_adapters
    model = _registry(base_dir, tmp_path)
    with torch.no_grad():
        lora.set_active(model, "a")
        torch.testing.assert_close(model(IDS).logits, a(IDS).logits, atol=1e-6, rtol=0)
        lora.set_active(model, "b")
        torch.testing.assert_close(model(IDS).logits, b(IDS).logits, atol=1e-6, rtol=0)
        lora.set_active(model, None)
        torch.testing.assert_close(model(IDS).logits, tiny_llama(vocab_size=300)(IDS).logits, atol=1e-6, rtol=0)


def test_adapters_targeting_different_modules_switch(two_adapters):
    base_dir, a, _, tmp_path = two_adapters
    mlp_only = _adapter(tmp_path / "m", base_dir, seed=5, targets=("gate_proj",))
    model = tiny_llama(vocab_size=300)
    lora.load(model, tmp_path / "a", "a")
    lora.load(model, tmp_path / "m", "m")
    with torch.no_grad():
        lora.set_active(model, "m")  # q/v/down layers hold only "a": they run their base
        torch.testing.assert_close(model(IDS).logits, mlp_only(IDS).logits, atol=1e-6, rtol=0)
        lora.set_active(model, "a")
        torch.testing.assert_close(model(IDS).logits, a(IDS).logits, atol=1e-6, rtol=0)
    with pytest.raises(ModelError, match="no adapter named 'c' to activate; loaded: a, m"):
        lora.set_active(model, "c")


def test_memory_is_base_plus_each_adapters_own_size(two_adapters):
    base_dir, a, b, tmp_path = two_adapters
    model = _registry(base_dir, tmp_path)
    base_total = count_parameters(tiny_llama(vocab_size=300))[1]
    own = [count_parameters(m)[1] - base_total for m in (a, b)]
    assert own[0] > 0 and own[1] > 0
    assert count_parameters(model)[1] == base_total + own[0] + own[1]


def test_delete_one_adapter(two_adapters):
    base_dir, a, b, tmp_path = two_adapters
    model = _registry(base_dir, tmp_path)
    before = count_parameters(model)[1]
    lora.delete_adapter(model, "a")
    assert count_parameters(model)[1] == before - (count_parameters(a)[1] - count_parameters(tiny_llama(300))[1])
    lora.set_active(model, "b")
    torch.testing.assert_close(model(IDS).logits, b(IDS).logits, atol=1e-6, rtol=0)
    with pytest.raises(ModelError, match="no adapter named 'a'"):
        lora.delete_adapter(model, "a")


def test_concatenation_is_exact_weighted_sum(two_adapters):
    base_dir, a, b, tmp_path = two_adapters
    model = _registry(base_dir, tmp_path)
    settings = lora.combine(model, {"a": 0.7, "b": 0.3}, "ab", how="cat")
    assert settings.r == 4 + 2
    for layer in lora.lora_layers(model).values():
        expected = 0.7 * layer.delta_weight("a") + 0.3 * layer.delta_weight("b")
        torch.testing.assert_close(layer.delta_weight("ab"), expected, atol=1e-6, rtol=0)
    # and it saves as an ordinary LoRA adapter that loads elsewhere with the same outputs
    lora.set_active(model, "ab")
    lora.save(model, settings, tmp_path / "ab", str(base_dir), adapter_name="ab")
    fresh = tiny_llama(vocab_size=300)
    lora.load(fresh, tmp_path / "ab")
    torch.testing.assert_close(fresh(IDS).logits, model(IDS).logits, atol=1e-5, rtol=0)


def test_linear_combination_of_one_adapter_scales_it_exactly(two_adapters):
    base_dir, a, b, tmp_path = two_adapters
    model = _registry(base_dir, tmp_path)
    with pytest.raises(ModelError, match="'half' is not allowed"):
        lora.combine(model, {"a": 0.5}, "half", how="linear")
    lora.combine(model, {"a": 0.5}, "halved", how="linear")
    for layer in lora.lora_layers(model).values():
        torch.testing.assert_close(layer.delta_weight("halved"), 0.5 * layer.delta_weight("a"), atol=1e-6, rtol=0)
    with pytest.raises(ModelError, match="equal rank"):
        lora.combine(model, {"a": 0.5, "b": 0.5}, "bad", how="linear")


def test_cli_generate_with_named_adapters(two_adapters, capsys):
    from tunesmith.cli import main

    base_dir, a, b, tmp_path = two_adapters
    model, _ = load_with_adapter(None, [f"a={tmp_path / 'a'}", f"b={tmp_path / 'b'}"], use="b")
    torch.testing.assert_close(model(IDS).logits, b(IDS).logits, atol=1e-6, rtol=0)
    assert main(["generate", "--model", str(base_dir), "--adapter", f"a={tmp_path / 'a'}", "--adapter",
                 f"b={tmp_path / 'b'}", "--use", "c", "--max-new-tokens", "2", "hi"]) == 2
    assert "no adapter of that name; loaded: a, b" in capsys.readouterr().err


def _dora_adapter(folder, base_dir, seed):
    from tunesmith.config.methods import DoraSettings
    from tunesmith.methods import dora

    model = tiny_llama(vocab_size=300)
    settings = DoraSettings(r=4, alpha=8, dropout=0.0, target_modules=["q_proj", "v_proj"])
    dora.apply(model, settings)
    g = torch.Generator().manual_seed(seed)
    for layer in dora.dora_layers(model).values():
        layer.lora_B["default"].weight.data = torch.randn(layer.lora_B["default"].weight.shape, generator=g) * 0.1
        m = layer.lora_magnitude_vector["default"]
        m.data = m.data * (1 + 0.1 * torch.randn(m.shape, generator=g))
    dora.save(model, settings, folder, str(base_dir))
    return model


def test_several_dora_adapters_switch_delete_and_refuse_to_combine(two_adapters):
    base_dir, _, _, tmp_path = two_adapters
    c = _dora_adapter(tmp_path / "c", base_dir, seed=3)
    d = _dora_adapter(tmp_path / "d", base_dir, seed=4)
    model, _ = load_with_adapter(None, [f"c={tmp_path / 'c'}", f"d={tmp_path / 'd'}"], use="c")
    with torch.no_grad():
        torch.testing.assert_close(model(IDS).logits, c(IDS).logits, atol=1e-5, rtol=0)
        lora.set_active(model, "d")
        torch.testing.assert_close(model(IDS).logits, d(IDS).logits, atol=1e-5, rtol=0)
    before = count_parameters(model)[1]
    lora.delete_adapter(model, "c")
    own_c = count_parameters(c)[1] - count_parameters(tiny_llama(vocab_size=300))[1]
    assert count_parameters(model)[1] == before - own_c  # the magnitude vectors went too
    with torch.no_grad():
        torch.testing.assert_close(model(IDS).logits, d(IDS).logits, atol=1e-5, rtol=0)
    model, _ = load_with_adapter(None, [f"c={tmp_path / 'c'}", f"d={tmp_path / 'd'}"])
    with pytest.raises(ModelError, match="only plain LoRA adapters can be combined"):
        lora.combine(model, {"c": 0.5, "d": 0.5}, "cd")


def test_lora_and_dora_adapters_cannot_share_a_model(two_adapters):
    from tunesmith.errors import ConfigError

    base_dir, _, _, tmp_path = two_adapters
    _dora_adapter(tmp_path / "c", base_dir, seed=3)
    with pytest.raises(ConfigError, match="cannot share the model with lora adapters"):
        load_with_adapter(None, [f"a={tmp_path / 'a'}", f"c={tmp_path / 'c'}"])


def test_chat_use_switches_adapter_and_a_wrong_name_keeps_the_session(two_adapters, monkeypatch, capsys):
    from tunesmith.cli import main

    base_dir, _, _, tmp_path = two_adapters
    lines = iter(["/use b", "/use c", "/use none", ""])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(lines))
    assert main(["chat", "--model", str(base_dir), "--adapter", f"a={tmp_path / 'a'}", "--adapter",
                 f"b={tmp_path / 'b'}", "--max-new-tokens", "2"]) == 0
    out = capsys.readouterr().out
    assert "(now using b)" in out and "(now using none)" in out
    assert "(not switched: no adapter named 'c' to activate; loaded: a, b)" in out
