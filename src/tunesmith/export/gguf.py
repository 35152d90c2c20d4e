"""A Llama-architecture model (a merged adapter, or any plain model) written as one GGUF file with the `gguf` package:
llama.cpp's tensor names, the shape and tokenizer metadata, the chat template, weights in f32, f16, q8_0 or q4_0.

Two layout rules of the format: GGUF stores q_proj/k_proj rows interleaved per head (llama.cpp's rotary layout, so
they are permuted here and transformers' reader permutes them back), and a tied LM head is left out (no output.weight).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from tunesmith.atomic import atomic_file
from tunesmith.errors import ConfigError, ModelError, OutputDirError

ARCHITECTURE = "llama"
QUANT_TYPES = ("f32", "f16", "q8_0", "q4_0")
BLOCK = 32  # q8_0 and q4_0 quantise runs of 32 values along a row
# the llama.cpp token types transformers' reader looks at
NORMAL, CONTROL, USER_DEFINED, UNUSED = 1, 3, 4, 5


def check_quant(quant: str) -> str:
    if quant not in QUANT_TYPES:
        raise ConfigError(f"--quant {quant}: unknown quantisation type; known: {', '.join(QUANT_TYPES)}")
    return quant


def _ggml_types(quant: str):
    from gguf import GGMLQuantizationType, LlamaFileType

    tensor_type = {"f32": GGMLQuantizationType.F32, "f16": GGMLQuantizationType.F16,
                   "q8_0": GGMLQuantizationType.Q8_0, "q4_0": GGMLQuantizationType.Q4_0}[quant]
    file_type = {"f32": LlamaFileType.ALL_F32, "f16": LlamaFileType.MOSTLY_F16,
                 "q8_0": LlamaFileType.MOSTLY_Q8_0, "q4_0": LlamaFileType.MOSTLY_Q4_0}[quant]
    return tensor_type, file_type


def check_architecture(config) -> None:
    if config.model_type != ARCHITECTURE:
        raise ModelError(f"GGUF export writes {ARCHITECTURE} models; this one is {config.model_type!r}. Use "
                         "--format hf for a plain HF folder instead")
    rope = getattr(config, "rope_parameters", None) or {}
    if rope.get("rope_type", "default") != "default":
        raise ModelError(f"GGUF export: rope_type {rope['rope_type']!r} (rope scaling) is not written yet; only "
                         "plain rotary embeddings are. Use --format hf")


def rotary_interleave(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """HF's q/k row order (each head: first halves, then second halves) → llama.cpp's (pairs interleaved)."""
    half = weight.shape[0] // heads // 2
    return weight.reshape(heads, 2, half, *weight.shape[1:]).transpose(1, 2).reshape(weight.shape)


def gguf_tensors(model, quant: str):
    """(gguf name, numpy data, ggml type) for every weight: 1-D tensors (norms, biases) stay f32; a matrix whose rows
    do not split into blocks of 32 falls back to f16 under q8_0/q4_0, as llama.cpp does."""
    from gguf import MODEL_ARCH, GGMLQuantizationType, get_tensor_name_map, quants

    config = model.config
    tensor_type, _ = _ggml_types(quant)
    names = get_tensor_name_map(MODEL_ARCH.LLAMA, config.num_hidden_layers)
    heads = {"q_proj": config.num_attention_heads, "k_proj": config.num_key_value_heads}
    tied = getattr(config, "tie_word_embeddings", False)
    for hf_name, tensor in model.state_dict().items():
        if tied and hf_name == "lm_head.weight":
            continue
        stem, _, suffix = hf_name.rpartition(".")
        gguf_stem = names.get_name(stem)
        if gguf_stem is None:
            raise ModelError(f"GGUF export: no GGUF name for the tensor {hf_name!r} of this {ARCHITECTURE} model")
        tensor = tensor.detach().float().cpu()
        projection = stem.rsplit(".", 1)[-1]
        if projection in heads:
            tensor = rotary_interleave(tensor, heads[projection])
        data = tensor.numpy()
        kind = tensor_type
        if data.ndim == 1:
            kind = GGMLQuantizationType.F32
        elif kind not in (GGMLQuantizationType.F32, GGMLQuantizationType.F16) and data.shape[-1] % BLOCK:
            kind = GGMLQuantizationType.F16
        yield f"{gguf_stem}.{suffix}", quants.quantize(data, kind), kind


def _is_byte_level(spec: dict | None) -> bool:
    if not spec:
        return False
    if spec.get("type") == "Sequence":
        return any(_is_byte_level(s) for s in spec.get("pretokenizers", []))
    return spec.get("type") == "ByteLevel" and spec.get("use_regex", True)


def tokenizer_metadata(tokenizer, vocab_size: int) -> dict:
    """The tokenizer as llama.cpp's keys describe it: a GPT-2 style byte-level BPE ('gpt2' model and pre-tokenizer)
    with its tokens in id order, their types, the merges and the special token ids."""
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    bpe = spec["model"]
    if bpe.get("type") != "BPE" or spec.get("pre_tokenizer", {}).get("type") != "ByteLevel" \
            or not _is_byte_level(spec.get("pre_tokenizer")):
        raise ModelError("GGUF export writes byte-level BPE tokenizers (GPT-2 style, as SmolLM2's); this tokenizer "
                         f"is {bpe.get('type')} with pre-tokenizer {spec.get('pre_tokenizer')}. Use --format hf")
    added = {t["id"]: t for t in spec.get("added_tokens", [])}
    size = max(vocab_size, max(bpe["vocab"].values()) + 1, max(added, default=-1) + 1)
    tokens, types = [f"[PAD{i}]" for i in range(size)], [UNUSED] * size
    for token, i in bpe["vocab"].items():
        tokens[i], types[i] = token, NORMAL
    for i, t in added.items():
        tokens[i], types[i] = t["content"], CONTROL if t["special"] else USER_DEFINED
    merges = [m if isinstance(m, str) else " ".join(m) for m in bpe.get("merges", [])]
    probe = tokenizer("a").input_ids
    meta = {"tokens": tokens, "types": types, "merges": merges,
            "add_bos": tokenizer.bos_token_id is not None and probe[:1] == [tokenizer.bos_token_id],
            "chat_template": tokenizer.chat_template if isinstance(tokenizer.chat_template, str) else None}
    for key in ("bos", "eos", "unk", "pad"):
        meta[key] = getattr(tokenizer, f"{key}_token_id", None)
    return meta


def _write_metadata(writer, model, tokenizer, quant: str, name: str) -> None:
    config = model.config
    _, file_type = _ggml_types(quant)
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    rope = getattr(config, "rope_parameters", None) or {}
    writer.add_name(name)
    writer.add_file_type(int(file_type))
    if quant in ("q8_0", "q4_0"):
        writer.add_quantization_version(2)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(float(rope.get("rope_theta", getattr(config, "rope_theta", 10000.0))))
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    writer.add_vocab_size(config.vocab_size)
    tok = tokenizer_metadata(tokenizer, config.vocab_size)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt2")
    writer.add_token_list(tok["tokens"])
    writer.add_token_types(tok["types"])
    writer.add_token_merges(tok["merges"])
    for key, add in (("bos", writer.add_bos_token_id), ("eos", writer.add_eos_token_id),
                     ("unk", writer.add_unk_token_id), ("pad", writer.add_pad_token_id)):
        if tok[key] is not None:
            add(int(tok[key]))
    writer.add_add_bos_token(tok["add_bos"])
    writer.add_add_space_prefix(False)
    if tok["chat_template"]:
        writer.add_chat_template(tok["chat_template"])


def write_gguf(model, tokenizer, dest: str | Path, quant: str = "f16", name: str = "tunesmith export",
               overwrite: bool = False) -> Path:
    """Write the model as one GGUF file, atomically (a temp file beside `dest`, fsync, rename)."""
    from gguf import GGUFWriter

    check_quant(quant)
    check_architecture(model.config)
    dest = Path(dest)
    if dest.is_dir():
        raise OutputDirError(f"{dest}: is a folder; GGUF export writes one file (e.g. {dest / 'model.gguf'})")
    if dest.exists() and not overwrite:
        raise OutputDirError(f"{dest} already exists; pass --overwrite to replace it")
    with atomic_file(dest) as tmp:
        writer = GGUFWriter(str(tmp), ARCHITECTURE)
        _write_metadata(writer, model, tokenizer, quant, name)
        with torch.no_grad():
            for gguf_name, data, kind in gguf_tensors(model, quant):
                writer.add_tensor(gguf_name, data, raw_dtype=kind)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        tmp.chmod(0o644)
    return dest


def gguf_header(path: str | Path) -> dict[str, object]:
    """The file's scalar and string metadata (arrays left out), for checks and reports."""
    from gguf import GGUFReader, GGUFValueType

    fields = {}
    for key, field in GGUFReader(str(path)).fields.items():
        if not field.types or field.types[0] == GGUFValueType.ARRAY:
            continue
        part = field.parts[field.data[0]]
        fields[key] = bytes(part).decode("utf-8") if field.types[0] == GGUFValueType.STRING else part.tolist()[0]
    return fields

