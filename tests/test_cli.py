"""merge → a plain HF folder that bare transformers loads with the adapter's outputs; generate and chat run."""

from pathlib import Path

import torch

from tunesmith.cli import main
from tunesmith.config import LoraSettings
from tunesmith.methods import lora
from tunesmith.models import load_model


def _trained_adapter(tiny_model_dir, tmp_path) -> Path:
    model = load_model(str(tiny_model_dir))
    settings = LoraSettings(r=4, alpha=8, dropout=0.0)
    lora.apply(model, settings)
    g = torch.Generator().manual_seed(0)
    for layer in lora.lora_layers(model).values():
        layer.lora_B["default"].weight.data = torch.randn(layer.lora_B["default"].weight.shape, generator=g) * 0.1
    lora.save(model, settings, tmp_path / "adapter", str(tiny_model_dir))
    return tmp_path / "adapter"


def test_merge_command_gives_a_plain_model_with_the_adapters_outputs(tiny_model_dir, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    adapter = _trained_adapter(tiny_model_dir, tmp_path)
    assert main(["merge", str(adapter), str(tmp_path / "merged")]) == 0
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    assert not any("lora" in n for n, _ in merged.named_parameters())
    with_adapter = load_model(str(tiny_model_dir))
    lora.load(with_adapter, adapter)
    ids = torch.randint(0, 300, (2, 10))
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, with_adapter(ids).logits, atol=1e-5, rtol=0)
    assert (tmp_path / "merged" / "tokenizer.json").is_file()
    # refuses to overwrite without --overwrite
    assert main(["merge", str(adapter), str(tmp_path / "merged")]) == 2
    assert "--overwrite" in capsys.readouterr().err


def test_generate_runs_with_and_without_adapter_and_the_adapter_is_applied(tiny_model_dir, tmp_path, capsys):
    from tunesmith.infer.adapters import load_with_adapter

    adapter = _trained_adapter(tiny_model_dir, tmp_path)
    assert main(["generate", "--model", str(tiny_model_dir), "--max-new-tokens", "8", "Hello"]) == 0
    assert main(["generate", "--adapter", str(adapter), "--max-new-tokens", "8", "Hello"]) == 0
    assert capsys.readouterr().out.count("\n") == 2
    base, _ = load_with_adapter(str(tiny_model_dir), None)
    adapted, _ = load_with_adapter(None, str(adapter))  # base found through adapter_config.json
    ids = torch.randint(0, 300, (1, 6))
    with torch.no_grad():
        assert (base(ids).logits - adapted(ids).logits).abs().max() > 1e-3


def test_chat_reads_turns_until_empty_line(tiny_model_dir, monkeypatch, capsys):
    lines = iter(["Hi there", "And again", ""])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(lines))
    assert main(["chat", "--model", str(tiny_model_dir), "--max-new-tokens", "4"]) == 0
    assert capsys.readouterr().out.count("model> ") == 2


def test_help_for_every_command(capsys):
    import pytest

    for cmd in ("train", "generate", "chat", "merge"):
        with pytest.raises(SystemExit) as e:
            main([cmd, "--help"])
        assert e.value.code == 0
        assert "usage: tunesmith " + cmd in capsys.readouterr().out
