"""A checkpoint's weights loaded tensor by tensor into the dtype that trains, so no larger copy is ever held.

transformers' `from_pretrained(dtype=bfloat16)` of an fp32 checkpoint maps the whole file and converts every tensor
from the mapping: the file's touched pages count in RSS beside the bf16 copies (SmolLM2-135M, measured on AMD EPYC
fam 25: 930 MiB above the process for 257 MiB of bf16 weights). Here the model is built with its parameters on the
meta device (buffers, such as rotary frequencies, are computed as usual), and each tensor is read from the
safetensors file with a plain read into a buffer of its own (the page cache is the kernel's, not the process's),
converted, and given to its parameter; a tensor already in the parameter's dtype is read straight into it. What is
converted or taken over is read into one staging buffer, reused tensor after tensor: glibc's malloc would otherwise
keep the freed buffers between the kept tensors (measured: a streamed QLoRA load of SmolLM2 peaked 280 MiB higher).
The peak is the weights in their final dtype plus the largest tensor converted (in the file's dtype). `place` may take a tensor over instead (QLoRA
quantises each base linear as it arrives: methods/qlora.py `quantize_on_load`).

Checkpoints whose keys are not exactly the model's parameter names (transformers' key renames and weight
conversions), or whose model keeps modules in fp32 itself, are not streamed: `stream_model` returns None and the
caller loads through transformers.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from tunesmith.errors import ModelError
from tunesmith.kernels.allocator import large_blocks_returned
from tunesmith.kernels.patches import is_conv1d, is_plain_linear

DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
          "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
          "BOOL": torch.bool}
INDEX = "model.safetensors.index.json"

# place(model, parameter name) -> None, or a function that takes that tensor (in the load's dtype) and puts something
# else in the parameter's place (its module replaced); the tensor is a view of a buffer reused for the next one
Place = Callable[[nn.Module, str], Callable[[torch.Tensor], None] | None]


def checkpoint_entries(folder: str | Path) -> dict[str, tuple[Path, dict]] | None:
    """Each tensor's (file, header entry: dtype, shape, data_offsets from the data start), or None without
    safetensors files."""
    folder = Path(folder)
    index = folder / INDEX
    if index.is_file():
        files = sorted({folder / f for f in json.loads(index.read_text())["weight_map"].values()})
    elif (folder / "model.safetensors").is_file():
        files = [folder / "model.safetensors"]
    else:
        return None
    entries = {}
    for path in files:
        header, start = _header(path)
        for key, entry in header.items():
            if key != "__metadata__":
                entries[key] = (path, {**entry, "start": start})
    return entries


def _header(path: Path) -> tuple[dict, int]:
    with open(path, "rb") as f:
        (size,) = struct.unpack("<Q", f.read(8))
        return json.loads(f.read(size)), 8 + size


def read_tensor(f, entry: dict, into: torch.Tensor | None = None) -> torch.Tensor:
    """One tensor read from an open safetensors file (into `into` where given: same dtype and shape)."""
    dtype, shape = DTYPES[entry["dtype"]], entry["shape"]
    begin, end = entry["data_offsets"]
    out = torch.empty(shape, dtype=dtype) if into is None else into
    f.seek(entry["start"] + begin)
    view = out.view(-1).view(torch.uint8) if out.numel() else out.view(torch.uint8)
    if f.readinto(memoryview(view.numpy())) != end - begin:
        raise ModelError(f"{f.name}: the file ends inside tensor data; the checkpoint is truncated")
    return out


def stream_model(folder: str, dtype: torch.dtype, place: Place | None = None, trust_remote_code: bool = False,
                 linear_dtype: torch.dtype | None = None):
    """The causal LM in `folder` with its floating-point weights in `dtype` (the weights of its plain linear layers in
    `linear_dtype` where given: what kernels/frozen_bf16.py would store them in), read tensor by tensor; None where
    the checkpoint cannot be streamed (see the module's docstring)."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    entries = checkpoint_entries(folder)
    if entries is None:
        return None
    config = AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code)
    with init_empty_weights(include_buffers=False):  # parameters on meta, buffers computed
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, trust_remote_code=trust_remote_code)
    if getattr(model, "_keep_in_fp32_modules_strict", None) or getattr(model, "_keep_in_fp32_modules", None):
        return None
    params = dict(model.named_parameters(remove_duplicate=False))
    tied = {name for name in params if name not in entries}
    if set(entries) - set(params) or not _ties_cover(model, tied):
        return None
    takers = {name: place(model, name) for name in entries} if place is not None else {}
    targets = {name: _target(entry, dtype) for name, (_, entry) in entries.items()}
    if linear_dtype is not None:
        for name in targets:
            module_name, _, attr = name.rpartition(".")
            module = model.get_submodule(module_name)
            if attr == "weight" and (is_plain_linear(module) or is_conv1d(module)):
                targets[name] = linear_dtype
    staged = [_nbytes(entry) for name, (_, entry) in entries.items()
              if takers.get(name) or targets[name] != DTYPES[entry["dtype"]]]
    by_file: dict[Path, list[str]] = {}
    for name in sorted(entries, key=lambda n: (entries[n][1]["start"] + entries[n][1]["data_offsets"][0])):
        by_file.setdefault(entries[name][0], []).append(name)
    with large_blocks_returned():
        staging = torch.empty(max(staged, default=0), dtype=torch.uint8)
        for path, names in by_file.items():
            with open(path, "rb", buffering=0) as f:
                for name in names:
                    _load_one(model, name, f, entries[name][1], targets[name], takers.get(name), staging)
        del staging
    model.tie_weights()
    if any(p.device.type == "meta" for p in model.parameters()):
        missing = [n for n, p in model.named_parameters() if p.device.type == "meta"]
        raise ModelError(f"model.path: {folder}: the checkpoint holds no weights for {', '.join(missing[:3])}")
    model.config.dtype = dtype
    try:
        model.generation_config = GenerationConfig.from_pretrained(folder)
    except OSError:
        pass  # no generation_config.json: from_config's default stays
    return model.eval()


def _ties_cover(model, absent: set[str]) -> bool:
    """Whether every parameter absent from the file is tied to one that is there (an output head tied to the input
    embeddings)."""
    if not absent:
        return True
    head, embeddings = model.get_output_embeddings(), model.get_input_embeddings()
    tie = getattr(model.config, "tie_word_embeddings", False) or getattr(
        model.config.get_text_config(), "tie_word_embeddings", False)
    names = {n for n, m in model.named_modules() if m is head}
    return bool(tie and head is not None and embeddings is not None
                and absent == {f"{n}.weight" for n in names})


def _nbytes(entry: dict) -> int:
    begin, end = entry["data_offsets"]
    return end - begin


def _target(entry: dict, dtype: torch.dtype) -> torch.dtype:
    """Floating-point tensors load in `dtype`; integer ones as they are."""
    stored = DTYPES[entry["dtype"]]
    return dtype if stored.is_floating_point else stored


def _load_one(model, name: str, f, entry: dict, target: torch.dtype, take, staging: torch.Tensor) -> None:
    module_name, _, attr = name.rpartition(".")
    module = model.get_submodule(module_name)
    param = getattr(module, attr)
    stored = DTYPES[entry["dtype"]]
    if list(param.shape) != list(entry["shape"]):
        raise ModelError(f"model.path: {f.name}: {name} has shape {entry['shape']}, the model's config makes it "
                         f"{list(param.shape)}")
    if take is None and stored == target:
        value = read_tensor(f, entry)
    else:
        value = read_tensor(f, entry, staging[:_nbytes(entry)].view(stored).view(entry["shape"])).to(target)
    if take is not None:
        take(value)
    else:
        setattr(module, attr, nn.Parameter(value, requires_grad=param.requires_grad))
