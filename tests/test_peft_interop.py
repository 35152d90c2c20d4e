"""PEFT is the oracle: its loader reads our adapters and we read its adapters, with the same logits."""

import torch
from conftest import tiny_llama

from tunesmith.config import LoraSettings
from tunesmith.methods import lora


def _ids():
    return torch.randint(0, 300, (2, 13), generator=torch.Generator().manual_seed(3))


def test_peft_loads_our_adapter(tmp_path):
    from peft import PeftModel

    ours = tiny_llama(vocab_size=300)
    settings = LoraSettings(r=4, alpha=16, dropout=0.0, rslora=True)
    lora.apply(ours, settings)
    g = torch.Generator().manual_seed(0)
    for layer in lora.lora_layers(ours).values():
        layer.lora_B["default"].weight.data = torch.randn(layer.lora_B["default"].weight.shape, generator=g) * 0.1
    lora.save(ours, settings, tmp_path / "ours", "tiny")
    expected = ours(_ids()).logits

    theirs = PeftModel.from_pretrained(tiny_llama(vocab_size=300), str(tmp_path / "ours")).eval()
    got = theirs(_ids()).logits
    assert (expected - tiny_llama(vocab_size=300)(_ids()).logits).abs().max() > 1e-3
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


def test_we_load_peft_adapter(tmp_path):
    from peft import LoraConfig, get_peft_model

    base = tiny_llama(vocab_size=300)
    config = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=["q_proj", "k_proj", "down_proj"],
                        init_lora_weights=False, task_type="CAUSAL_LM")
    peft_model = get_peft_model(base, config).eval()
    expected = peft_model(_ids()).logits
    peft_model.save_pretrained(str(tmp_path / "theirs"))

    ours = tiny_llama(vocab_size=300)
    settings = lora.load(ours, tmp_path / "theirs")
    assert settings.r == 8 and sorted(settings.target_modules) == ["down_proj", "k_proj", "q_proj"]
    assert (expected - tiny_llama(vocab_size=300)(_ids()).logits).abs().max() > 1e-3
    torch.testing.assert_close(ours(_ids()).logits, expected, atol=1e-5, rtol=0)
