"""merge → a plain HF folder that bare transformers loads with the adapter's outputs; generate and chat run."""

from pathlib import Path

import pytest
import torch

from tunesmith.cli import build_parser, main
from tunesmith.config import LoraSettings
from tunesmith.methods import lora
from tunesmith.models import load_model, load_tokenizer


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


def test_chat_reads_turns_until_empty_line_and_answers_with_the_whole_history(tiny_model_dir, monkeypatch, capsys):
    """The tiny random model's greedy answer is blank lines only (its tied head repeats the last token), so the turns
    are sampled, each from a seed set as the turn is read; the answers must be what generate_chat gives for the whole
    history up to each turn."""
    from tunesmith.infer.generate import generate_chat

    turns = ["Hi there", "And again", ""]
    read = iter(enumerate(turns))

    def typed(prompt=""):
        i, line = next(read)
        torch.manual_seed(i)
        return line

    monkeypatch.setattr("builtins.input", typed)
    assert main(["chat", "--model", str(tiny_model_dir), "--system", "Be brief.", "--max-new-tokens", "6",
                 "--temperature", "1.0"]) == 0
    printed = [line.removeprefix("model> ") for line in capsys.readouterr().out.splitlines()
               if line.startswith("model> ")]
    model, tok = load_model(str(tiny_model_dir)).eval(), load_tokenizer(str(tiny_model_dir))
    history, expected = [{"role": "system", "content": "Be brief."}], []
    for i, turn in enumerate(turns[:2]):
        history.append({"role": "user", "content": turn})
        torch.manual_seed(i)
        expected.append(generate_chat(model, tok, history, 6, 1.0))
        history.append({"role": "assistant", "content": expected[-1]})
    assert printed == expected and all(expected) and expected[0] != expected[1]


def _commands(parser, prefix=()) -> list[tuple[str, ...]]:
    """Every command and sub-command, read from the parser itself (a new one is covered without listing it)."""
    import argparse

    found = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                found.append((*prefix, name))
                found += _commands(sub, (*prefix, name))
    return found


COMMANDS = _commands(build_parser())


def test_the_enumeration_reaches_every_group_and_the_nested_commands():
    from tunesmith.cli import GROUPS

    assert {("train",), ("generate",), ("chat",), ("rag",), ("rag", "index"), ("rag", "ask"), ("rag", "eval"),
            ("quantize",), ("generate-image",)} <= set(COMMANDS)
    assert len(COMMANDS) >= len(GROUPS) + 3


@pytest.mark.parametrize("command", COMMANDS, ids=" ".join)
def test_help_for_every_command(command, capsys):
    with pytest.raises(SystemExit) as e:
        main([*command, "--help"])
    assert e.value.code == 0
    assert capsys.readouterr().out.startswith("usage: tunesmith " + " ".join(command) + " ")
