"""A transformers causal LM (a merged adapter, or any plain model) written as one GGUF file that llama.cpp runs: the
architecture, hyperparameters and tensor names from the gguf package's tables (export/gguf_arch.py,
export/gguf_tensors.py), the tokenizer as llama.cpp's vocabulary (export/gguf_vocab.py), the chat template, weights in
f32, f16, q8_0 or q4_0 (the types the gguf package quantises; its k-quants it can only read).
"""

from __future__ import annotations

from pathlib import Path

import torch

from tunesmith.atomic import atomic_file
from tunesmith.errors import ConfigError, OutputDirError
from tunesmith.export.gguf_arch import gguf_arch, write_hparams
from tunesmith.export.gguf_tensors import named_tensors, quantised
from tunesmith.export.gguf_vocab import write_vocabulary

QUANT_TYPES = ("f32", "f16", "q8_0", "q4_0")


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


def gguf_tensors(model, quant: str):
    """(gguf name, data, ggml type) for every weight of the model, in llama.cpp's layout."""
    arch, arch_name = gguf_arch(model.config)
    return quantised(named_tensors(model, arch, arch_name), _ggml_types(quant)[0])


def _write_metadata(writer, model, tokenizer, quant: str, name: str, arch_name: str) -> None:
    writer.add_name(name)
    writer.add_file_type(int(_ggml_types(quant)[1]))
    if quant in ("q8_0", "q4_0"):
        writer.add_quantization_version(2)
    write_hparams(writer, model.config, arch_name)
    writer.add_vocab_size(model.get_input_embeddings().weight.shape[0])
    write_vocabulary(writer, tokenizer, model.get_input_embeddings().weight.shape[0])


def write_gguf(model, tokenizer, dest: str | Path, quant: str = "f16", name: str = "tunesmith export",
               overwrite: bool = False) -> Path:
    """Write the model as one GGUF file, atomically (a temp file beside `dest`, fsync, rename)."""
    from gguf import GGUFWriter

    check_quant(quant)
    _, arch_name = gguf_arch(model.config)
    dest = Path(dest)
    if dest.is_dir():
        raise OutputDirError(f"{dest}: is a folder; GGUF export writes one file (e.g. {dest / 'model.gguf'})")
    if dest.exists() and not overwrite:
        raise OutputDirError(f"{dest} already exists; pass --overwrite to replace it")
    with atomic_file(dest) as tmp:
        writer = GGUFWriter(str(tmp), arch_name)
        _write_metadata(writer, model, tokenizer, quant, name, arch_name)
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

