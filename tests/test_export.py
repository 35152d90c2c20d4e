"""`tunesmith export`: merged HF folders and GGUF files that bare transformers loads with the same logits."""

import os

import pytest
import torch

from tunesmith.cli import main
from tunesmith.config.methods import (AdapterSettings, BitFitSettings, DoraSettings, FreezeSettings, IA3Settings,
                                      LoraSettings, PrefixSettings, PromptSettings)
from tunesmith.methods import get_method
from tunesmith.models import load_model

# max |Δlogit| / max |logit| of our GGUF (read back by transformers) against the model it was written from, on the
# tiny random Llama (49k vocabulary): measured f32 0, f16 2.6e-4, q8_0 8.0e-3, q4_0 1.0e-1
RELATIVE_TOLERANCE = {"f32": 1e-6, "f16": 1e-3, "q8_0": 2e-2, "q4_0": 2e-1}
SETTINGS = {"lora": LoraSettings(r=4, alpha=8, dropout=0.0), "dora": DoraSettings(r=4, alpha=8, dropout=0.0),
            "ia3": IA3Settings(), "freeze": FreezeSettings(last_layers=1), "bitfit": BitFitSettings(),
            "adapter": AdapterSettings(reduction_factor=8), "prompt": PromptSettings(num_virtual_tokens=3),
            "prefix": PrefixSettings(num_virtual_tokens=3, projection=False)}


@pytest.fixture(scope="module")
def small_vocab_dir(tmp_path_factory, tokenizer):
    """The tiny Llama with a 400-token byte-level BPE (trained here, SmolLM2's chat template): GGUF files whose
    vocabulary transformers reads back in a second, where SmolLM2's 49k tokens take ~15 s per load."""
    from conftest import qa_rows, tiny_llama
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator([r["instruction"] + " " + r["output"] for r in qa_rows(64)], vocab_size=400,
                            special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    small = PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                    pad_token="<|im_end|>", unk_token="<|endoftext|>")
    small.chat_template = tokenizer.chat_template
    folder = tmp_path_factory.mktemp("small-vocab")
    tiny_llama(len(small)).save_pretrained(folder)
    small.save_pretrained(folder)
    return folder


def vocab_of(folder) -> int:
    import json

    return json.loads((folder / "config.json").read_text())["vocab_size"]


def ids_for(vocab: int) -> torch.Tensor:
    return torch.randint(0, vocab, (2, 16), generator=torch.Generator().manual_seed(0))


def make_adapter(method: str, base_dir, folder):
    """An adapter of `method` on the tiny model whose trainable tensors are perturbed (so it changes the outputs)."""
    model = load_model(str(base_dir))
    module = get_method(method)
    module.apply(model, SETTINGS[method])
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.05)
    module.save(model, SETTINGS[method], folder, str(base_dir))
    return folder


def base_plus_adapter(base_dir, adapter):
    from tunesmith.infer.adapters import load_with_adapter

    model, _ = load_with_adapter(str(base_dir), str(adapter))
    return model


def load_gguf(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()


@pytest.mark.parametrize("quant", ["f32", "f16", "q8_0", "q4_0"])
def test_gguf_round_trip_per_quant_type(small_vocab_dir, tmp_path, quant):
    from transformers import AutoTokenizer

    from tunesmith.export.gguf import gguf_header

    out = tmp_path / f"model-{quant}.gguf"
    assert main(["export", str(small_vocab_dir), str(out), "--format", "gguf", "--quant", quant]) == 0
    ours = load_model(str(small_vocab_dir))
    theirs = load_gguf(out)
    ids = ids_for(vocab_of(small_vocab_dir))
    with torch.no_grad():
        expected, got = ours(ids).logits, theirs(ids).logits
    relative = ((expected - got).abs().max() / expected.abs().max()).item()
    assert relative <= RELATIVE_TOLERANCE[quant]
    if quant == "f32":
        assert relative < 1e-6
    header = gguf_header(out)
    assert header["general.architecture"] == "llama" and header["llama.block_count"] == 2
    assert header["llama.attention.head_count_kv"] == 2 and header["tokenizer.ggml.model"] == "gpt2"


def test_gguf_carries_smollm2s_tokenizer_and_chat_template(tiny_model_dir, tokenizer, tmp_path):
    from transformers import AutoTokenizer

    out = tmp_path / "m.gguf"
    assert main(["export", str(tiny_model_dir), str(out), "--format", "gguf", "--quant", "q8_0"]) == 0
    back = AutoTokenizer.from_pretrained(str(tmp_path), gguf_file=out.name)
    text = tokenizer.apply_chat_template([{"role": "user", "content": "Hi 123, ünïcode!"}], tokenize=False,
                                         add_generation_prompt=True)
    assert back(text).input_ids == tokenizer(text).input_ids
    assert back.chat_template == tokenizer.chat_template
    assert (back.eos_token, back.pad_token, back.bos_token) == (tokenizer.eos_token, tokenizer.pad_token,
                                                               tokenizer.bos_token)


@pytest.mark.parametrize("method", ["lora", "dora", "ia3", "freeze", "bitfit"])
def test_every_mergeable_method_exports_hf_and_gguf_with_the_adapters_logits(small_vocab_dir, tmp_path, method):
    from transformers import AutoConfig, AutoModelForCausalLM

    adapter = make_adapter(method, small_vocab_dir, tmp_path / "adapter")
    ids = ids_for(vocab_of(small_vocab_dir))
    with torch.no_grad():
        expected = base_plus_adapter(small_vocab_dir, adapter)(ids).logits
        assert (expected - load_model(str(small_vocab_dir))(ids).logits).abs().max() > 1e-3  # the adapter matters
    assert main(["export", str(adapter), str(tmp_path / "hf"), "--format", "hf"]) == 0
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert main(["export", str(adapter), str(tmp_path / "m.gguf"), "--format", "gguf", "--quant", "f32"]) == 0
    extra = {}
    if method == "bitfit":  # GGUF metadata cannot say "llama with biases": hand transformers the merged config
        extra["config"] = AutoConfig.from_pretrained(tmp_path / "hf")
    gguf = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file="m.gguf", dtype=torch.float32, **extra).eval()
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, expected, atol=1e-4, rtol=0)
        torch.testing.assert_close(gguf(ids).logits, merged(ids).logits, atol=1e-4, rtol=0)


@pytest.mark.parametrize("method", ["prefix", "prompt", "adapter"])
def test_methods_that_cannot_merge_say_so_and_ship_the_adapter_beside_the_base(small_vocab_dir, tmp_path, capsys,
                                                                               method):
    adapter = make_adapter(method, small_vocab_dir, tmp_path / "adapter")
    assert main(["export", str(adapter), str(tmp_path / "m.gguf"), "--format", "gguf"]) == 2
    err = capsys.readouterr().err
    assert f"method {method!r} cannot be merged" in err and "--format hf --separate-adapter" in err
    assert not (tmp_path / "m.gguf").exists()
    assert main(["export", str(adapter), str(tmp_path / "hf"), "--format", "hf"]) == 2
    assert "--separate-adapter" in capsys.readouterr().err and not (tmp_path / "hf").exists()
    if method != "prefix":
        return
    assert main(["export", str(adapter), str(tmp_path / "hf"), "--format", "hf", "--separate-adapter"]) == 0
    ids = ids_for(vocab_of(small_vocab_dir))
    with torch.no_grad():
        shipped = base_plus_adapter(tmp_path / "hf", tmp_path / "hf" / "adapter")(ids).logits
        torch.testing.assert_close(shipped, base_plus_adapter(small_vocab_dir, adapter)(ids).logits, atol=1e-5, rtol=0)


def test_unknown_quant_type_lists_the_known_ones(small_vocab_dir, tmp_path, capsys):
    assert main(["export", str(small_vocab_dir), str(tmp_path / "m.gguf"), "--format", "gguf", "--quant", "q3_k"]) == 2
    assert "--quant q3_k: unknown quantisation type; known: f32, f16, q8_0, q4_0" in capsys.readouterr().err
    assert not (tmp_path / "m.gguf").exists()


def test_gguf_output_is_atomic_and_not_overwritten_without_asking(small_vocab_dir, tmp_path, monkeypatch, capsys):
    from tunesmith.export import gguf

    out = tmp_path / "m.gguf"
    out.write_bytes(b"previous")
    assert main(["export", str(small_vocab_dir), str(out), "--format", "gguf"]) == 2
    assert "--overwrite" in capsys.readouterr().err

    real = gguf.gguf_tensors
    monkeypatch.setattr(gguf, "gguf_tensors", lambda model, quant: _fail_after(real(model, quant), 3))
    with pytest.raises(RuntimeError, match="disk full"):
        main(["export", str(small_vocab_dir), str(out), "--format", "gguf", "--overwrite"])
    assert out.read_bytes() == b"previous"
    assert sorted(os.listdir(tmp_path)) == ["m.gguf"]  # no temp file left behind


def _fail_after(items, n):
    for i, item in enumerate(items):
        if i == n:
            raise RuntimeError("disk full")
        yield item
