"""A tokenizer as llama.cpp's vocabulary keys describe it, read from the tokenizer's own `tokenizer.json`:

- a byte-level BPE (GPT-2, Llama-3, Qwen, SmolLM) is llama.cpp's "gpt2" model with a named pre-tokenizer. llama.cpp
  knows pre-tokenizers by name only; each name stands for the split rules it applies before BPE. The name written
  here is the one whose split rules equal this tokenizer's (read from its pre_tokenizer), so a tokenizer is matched
  by what it does, never by the model family it came with. A split rule llama.cpp has no name for is refused.
- a BPE over sentencepiece pieces with byte fallback (Llama-2, Mistral, Phi-3, Gemma) is llama.cpp's "llama" model,
  which merges the adjacent pair whose result scores highest: each token's score is minus the rank of the first
  merge that makes it, which orders llama.cpp's merges as the BPE's merge list orders them.
"""

from __future__ import annotations

import json
import re

from tunesmith.errors import ModelError

GPT2_SPLIT = "byte-level (GPT-2) regex"
SPLIT_DIGITS = r"\p{N}"
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                 r"\s*[\r\n]+|\s+(?!\S)|\s+")
# llama.cpp's pre-tokenizer names (src/llama-vocab.cpp, llama_vocab::impl::load) keyed by the split rules they stand
# for, as a tokenizer.json writes them; the gguf package carries no such table
LLAMACPP_PRE_TOKENIZERS = {
    (GPT2_SPLIT,): "gpt-2",
    (SPLIT_DIGITS, GPT2_SPLIT): "smollm",
    (_LLAMA3_SPLIT,): "llama-bpe",
    (_LLAMA3_SPLIT.replace(r"\p{N}{1,3}", r"\p{N}"),): "qwen2",
    (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|"
     r"\s+(?!\S)|\s+",): "qwen35",
}
# llama.cpp's token types (gguf.TokenType's values)
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
SPACE_PIECE = "\u2581"


def split_rules(spec: dict | None) -> tuple[str, ...]:
    """The regexes a tokenizers pre_tokenizer splits by, in order (ByteLevel's own regex named GPT2_SPLIT)."""
    if not spec:
        return ()
    kind = spec.get("type")
    if kind == "Sequence":
        return tuple(rule for part in spec.get("pretokenizers", []) for rule in split_rules(part))
    if kind == "ByteLevel":
        return (GPT2_SPLIT,) if spec.get("use_regex", True) else ()
    if kind == "Digits":
        return (SPLIT_DIGITS,) if spec.get("individual_digits") else (r"\p{N}+",)
    if kind == "Split":
        pattern = spec.get("pattern", {})
        return (pattern.get("Regex") or re.escape(pattern.get("String", "")),)
    if kind == "Metaspace":
        return ()
    return (f"{kind} pre-tokenizer",)


def pre_tokenizer_name(spec: dict | None) -> str:
    rules = split_rules(spec)
    name = LLAMACPP_PRE_TOKENIZERS.get(rules)
    if name is None:
        raise ModelError(f"GGUF export: llama.cpp knows no pre-tokenizer that splits text as this tokenizer does "
                         f"({' then '.join(rules) or 'no split'}); known: GPT-2, SmolLM, Llama-3, Qwen2 and Qwen3.5 "
                         "splits. Use --format hf")
    return name


def _is_byte_level(spec: dict) -> bool:
    decoder = spec.get("decoder") or {}
    parts = decoder.get("decoders", [decoder]) if decoder.get("type") == "Sequence" else [decoder]
    return any(p.get("type") == "ByteLevel" for p in parts)


def _adds_space_prefix(spec: dict) -> bool:
    """Whether the tokenizer puts '▁' before the text (sentencepiece's add_dummy_prefix)."""
    def walk(node):
        if not node:
            return False
        if node.get("type") == "Sequence":
            return any(walk(n) for n in node.get("normalizers", node.get("pretokenizers", [])))
        if node.get("type") == "Prepend":
            return node.get("prepend") == SPACE_PIECE
        return node.get("type") == "Metaspace" and node.get("prepend_scheme", "always") != "never"
    return walk(spec.get("normalizer")) or walk(spec.get("pre_tokenizer"))


def _merge_pairs(merges) -> list[tuple[str, str]]:
    return [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in merges]


def tokenizer_metadata(tokenizer, vocab_size: int) -> dict:
    """tokens (id order, padded to the model's embedding rows), types, model ('gpt2' or 'llama'), pre-tokenizer,
    merges or scores, special token ids, add_bos, add_space_prefix and the chat template."""
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    bpe = spec["model"]
    if bpe.get("type") != "BPE":
        raise ModelError(f"GGUF export writes BPE tokenizers (byte-level or sentencepiece-style); this one is "
                         f"{bpe.get('type')}. Use --format hf")
    added = {t["id"]: t for t in spec.get("added_tokens", [])}
    size = max(max(bpe["vocab"].values()) + 1, max(added, default=-1) + 1)
    if size > vocab_size:
        raise ModelError(f"GGUF export: the tokenizer has {size} tokens but the model's embedding only "
                         f"{vocab_size} rows")
    tokens, types = [f"[PAD{i}]" for i in range(vocab_size)], [UNUSED] * vocab_size
    for token, i in bpe["vocab"].items():
        tokens[i], types[i] = token, NORMAL
    pairs = _merge_pairs(bpe.get("merges", []))
    meta = {"tokens": tokens, "types": types}
    if _is_byte_level(spec):
        meta.update(model="gpt2", pre=pre_tokenizer_name(spec.get("pre_tokenizer")), add_space_prefix=False,
                    merges=[" ".join(p) for p in pairs])
    elif bpe.get("byte_fallback"):
        scores = [-1e9] * vocab_size
        for rank, (left, right) in reversed(list(enumerate(pairs))):
            i = bpe["vocab"].get(left + right)
            if i is not None:
                scores[i] = -float(rank)
        for i, token in enumerate(tokens):
            if re.fullmatch(r"<0x[0-9A-F]{2}>", token):
                types[i] = BYTE
        if bpe.get("unk_token") in bpe["vocab"]:
            types[bpe["vocab"][bpe["unk_token"]]] = UNKNOWN
        meta.update(model="llama", pre="default", add_space_prefix=_adds_space_prefix(spec), scores=scores)
    else:
        raise ModelError("GGUF export writes byte-level BPE or sentencepiece-style BPE (with byte fallback) "
                         "tokenizers; this BPE is neither. Use --format hf")
    for i, t in added.items():
        tokens[i] = t["content"]
        types[i] = CONTROL if t["special"] else USER_DEFINED
        if meta["model"] == "llama":
            meta["scores"][i] = -1000.0
            if not t["special"]:
                tokens[i] = t["content"].replace(SPACE_PIECE, " ")
    probe = tokenizer("a").input_ids
    meta.update(add_bos=tokenizer.bos_token_id is not None and probe[:1] == [tokenizer.bos_token_id],
                add_eos=tokenizer.eos_token_id is not None and probe[-1:] == [tokenizer.eos_token_id],
                chat_template=tokenizer.chat_template if isinstance(tokenizer.chat_template, str) else None)
    for key in ("bos", "eos", "unk", "pad"):
        meta[key] = getattr(tokenizer, f"{key}_token_id", None)
    return meta


def write_vocabulary(writer, tokenizer, vocab_size: int) -> dict:
    tok = tokenizer_metadata(tokenizer, vocab_size)
    writer.add_tokenizer_model(tok["model"])
    writer.add_tokenizer_pre(tok["pre"])
    writer.add_token_list(tok["tokens"])
    writer.add_token_types(tok["types"])
    if "merges" in tok:
        writer.add_token_merges(tok["merges"])
    else:
        writer.add_token_scores(tok["scores"])
    for key in ("bos", "eos", "unk", "pad"):
        if tok[key] is not None:
            getattr(writer, f"add_{key}_token_id")(int(tok[key]))
    writer.add_add_bos_token(tok["add_bos"])
    writer.add_add_eos_token(tok["add_eos"])
    writer.add_add_space_prefix(tok["add_space_prefix"])
    if tok["chat_template"]:
        writer.add_chat_template(tok["chat_template"])
    return tok
