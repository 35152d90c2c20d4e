"""GGUF export of every family: the vocabulary as llama.cpp reads it (the tokenizer's own ids, types, pre-tokenizer
name) and the weights as transformers' GGUF reader reads them back (logits equal to the source's). llama.cpp itself
is the oracle of bench/llamacpp_check.py; these are its cheap CI stand-ins."""

import json

import pytest
import torch

from families import FAMILIES, UNTIED, family_tokenizer, tiny_family_model
from tunesmith.errors import ModelError
from tunesmith.export.gguf import write_gguf
from tunesmith.export.gguf_vocab import BYTE, CONTROL, NORMAL, USER_DEFINED, tokenizer_metadata

# what each family's tokenizer is to llama.cpp: (tokenizer.ggml.model, tokenizer.ggml.pre). SmolLM2's builtin
# tokenizer (read from its GGUF by transformers) splits as GPT-2's ByteLevel does, so it is GPT-2's split here
VOCAB_KIND = {"llama2": ("llama", "default"), "mistral": ("llama", "default"), "phi3": ("llama", "default"),
              "gemma2": ("llama", "default"), "gemma3": ("llama", "default"), "llama3": ("gpt2", "llama-bpe"),
              "smollm3": ("gpt2", "llama-bpe"), "qwen2": ("gpt2", "qwen2"), "qwen3": ("gpt2", "qwen2"),
              "smollm2": ("gpt2", "gpt-2"), "gpt2": ("gpt2", "gpt-2")}
ARCH = {"llama2": "llama", "llama3": "llama", "mistral": "llama", "smollm2": "llama", "qwen2": "qwen2",
        "qwen3": "qwen3", "gemma2": "gemma2", "gemma3": "gemma3", "phi3": "phi3", "gpt2": "gpt2", "smollm3": "smollm3"}
READ_BY_TRANSFORMERS = ("llama3", "mistral", "qwen2", "qwen3", "gemma2", "gemma3", "phi3", "gpt2")


@pytest.mark.parametrize("family", FAMILIES)
def test_vocabulary_is_the_tokenizers_own_under_llamacpps_names(family):
    tok = family_tokenizer(family)
    meta = tokenizer_metadata(tok, len(tok) + 3)
    assert (meta["model"], meta["pre"]) == VOCAB_KIND[family]
    assert len(meta["tokens"]) == len(tok) + 3 and meta["tokens"][-1] == f"[PAD{len(tok) + 2}]"
    ids = list(range(len(tok)))
    added = tok.added_tokens_decoder
    plain = [i for i in ids if i not in added]
    assert [meta["tokens"][i] for i in plain] == tok.convert_ids_to_tokens(plain)
    assert [meta["types"][i] for i in added] == [CONTROL if t.special else USER_DEFINED for t in added.values()]
    assert meta["add_bos"] == (tok("a").input_ids[:1] == [tok.bos_token_id])
    assert meta["chat_template"] == tok.chat_template and meta["eos"] == tok.eos_token_id
    if meta["model"] == "llama":  # sentencepiece-style: byte pieces, and scores that order merges as the BPE does
        spec = json.loads(tok.backend_tokenizer.to_str())["model"]
        assert meta["types"][tok.convert_tokens_to_ids("<0x41>")] == BYTE
        first, second = spec["merges"][0], spec["merges"][1]
        first, second = (m.split(" ") if isinstance(m, str) else m for m in (first, second))
        made = [meta["scores"][tok.convert_tokens_to_ids("".join(m))] for m in (first, second)]
        assert made == [0.0, -1.0]
        assert meta["add_space_prefix"] == (tok("a").input_ids[-1:] == tok.convert_tokens_to_ids(["\u2581a"]))
    else:
        assert len(meta["merges"]) == len(json.loads(tok.backend_tokenizer.to_str())["model"]["merges"])
        assert meta["types"][plain[0]] == NORMAL


@pytest.fixture(scope="module")
def small_tokenizer():
    """A 300-token byte-level BPE: the weights' checks read back in a second, where a family's 32k–50k vocabulary
    makes every read of the file (gguf's reader, transformers') take 3–7 s."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(["Hello world 123, the quick brown fox; def f(x): return x"] * 8, vocab_size=300,
                            special_tokens=["<|endoftext|>"])
    return PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, eos_token="<|endoftext|>")


def small_vocab_model(family, vocab: int):
    model = tiny_family_model(family)
    model.resize_token_embeddings(vocab)
    for key in ("pad_token_id", "bos_token_id", "eos_token_id"):
        setattr(model.config, key, None)
    with torch.no_grad():  # norms away from their initial 1 (or 0), so that Gemma's +1 convention shows
        for name, p in model.named_parameters():
            if p.ndim == 1:
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(1)) * 0.1)
    return model


@pytest.mark.parametrize("family", [f for f in FAMILIES if f not in ("llama2", "smollm2", "smollm3")])
def test_weights_read_back_by_transformers_with_equal_logits(family, small_tokenizer, tmp_path):
    """llama2 and smollm2 are llama3's architecture without its rope scaling; smollm3 has a test of its own."""
    from gguf import MODEL_ARCH_NAMES, MODEL_TENSORS, TENSOR_NAMES, GGUFReader
    from transformers import AutoModelForCausalLM

    model = small_vocab_model(family, len(small_tokenizer))
    out = write_gguf(model, small_tokenizer, tmp_path / "m.gguf", "f32")
    reader = GGUFReader(str(out))
    arch = next(a for a, n in MODEL_ARCH_NAMES.items() if n == ARCH[family])
    known = {TENSOR_NAMES[t].format(bid=i) for t in MODEL_TENSORS[arch] for i in range(model.config.num_hidden_layers)}
    names = {t.name: t for t in reader.tensors}
    assert {n.rsplit(".", 1)[0] for n in names} <= known
    assert ("output.weight" in names) == (family in UNTIED)
    assert ("rope_freqs.weight" in names) == (family == "llama3")
    hidden, vocab = model.config.hidden_size, len(small_tokenizer)
    assert list(names["token_embd.weight"].shape) == [hidden, vocab]  # gguf lists dimensions innermost first
    if family.startswith("gemma"):  # Gemma's norms multiply by (1 + weight); llama.cpp's by the weight
        hf = model.model.layers[0].input_layernorm.weight
        torch.testing.assert_close(torch.from_numpy(names["blk.0.attn_norm.weight"].data.copy()), hf + 1)
    ids = torch.randint(0, vocab, (1, 8 if family == "mistral" else 16), generator=torch.Generator().manual_seed(0))
    config = {} if family == "mistral" else {"config": model.config}  # mistral is written as llama, as llama.cpp does
    back = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file=out.name, dtype=torch.float32,
                                                **config).eval()
    with torch.no_grad():
        torch.testing.assert_close(back(ids).logits, model(ids).logits, atol=1e-4, rtol=0)


def test_smollm3_with_llamacpps_rope_layout_exports_and_another_is_refused(small_tokenizer, tmp_path):
    from gguf import GGUFReader
    from transformers import SmolLM3ForCausalLM

    tiny = tiny_family_model("smollm3")  # no_rope_layers [1, 0]: llama.cpp drops rope on every 4th layer only
    with pytest.raises(ModelError, match=r"smollm3 leaves out rope on every 4th layer; this model's no_rope_layers "
                                         r"is \[1, 0\]"):
        write_gguf(tiny, family_tokenizer("smollm3"), tmp_path / "no.gguf", "f16")
    assert not (tmp_path / "no.gguf").exists()
    config = tiny.config
    config.num_hidden_layers, config.no_rope_layers, config.layer_types = 4, [1, 1, 1, 0], ["full_attention"] * 4
    config.vocab_size, config.pad_token_id = len(small_tokenizer), None
    out = write_gguf(SmolLM3ForCausalLM(config), small_tokenizer, tmp_path / "m.gguf", "q8_0")
    fields = GGUFReader(str(out)).fields
    assert bytes(fields["general.architecture"].parts[-1]).decode() == "smollm3"
    assert fields["smollm3.block_count"].parts[-1][0] == 4


def test_families_llamacpp_cannot_take_are_refused_with_a_sentence(small_tokenizer, tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    model = small_vocab_model("gemma2", len(small_tokenizer))
    model.config.tie_word_embeddings = False
    model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone())
    with pytest.raises(ModelError, match="llama.cpp's gemma2 has no output tensor"):
        write_gguf(model, small_tokenizer, tmp_path / "m.gguf")
    model.config.model_type = "opt"
    with pytest.raises(ModelError, match="no architecture for model_type 'opt'"):
        write_gguf(model, small_tokenizer, tmp_path / "m.gguf")
    model = small_vocab_model("llama3", len(small_tokenizer))
    model.config.model_type, model.config.embedding_multiplier = "granite", 12.0  # Granite's scales: not written
    with pytest.raises(ModelError, match="scales its computation by embedding_multiplier=12.0"):
        write_gguf(model, small_tokenizer, tmp_path / "m.gguf")
    whitespace = Tokenizer(models.BPE(vocab={"a": 0, "b": 1, "ab": 2}, merges=[("a", "b")]))
    whitespace.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    with pytest.raises(ModelError, match="byte-level BPE or sentencepiece-style BPE"):
        write_gguf(small_vocab_model("qwen2", 3), PreTrainedTokenizerFast(tokenizer_object=whitespace),
                   tmp_path / "m.gguf")
    assert not (tmp_path / "m.gguf").exists()
