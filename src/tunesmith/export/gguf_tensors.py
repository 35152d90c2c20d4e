"""The model's weights under llama.cpp's tensor names (the gguf package's tensor name map for the architecture), in
the layout and convention llama.cpp computes with. Each change is decided by a rule on the model, not its family:

- a `Conv1D` weight (GPT-2) is stored transposed by transformers: it is turned back to (out, in);
- q/k rows are interleaved per head where llama.cpp's rotary embedding turns adjacent pairs (NORM_ROPE_ARCHS);
- a norm whose module multiplies by (1 + weight) (Gemma's) is written as 1 + weight, llama.cpp multiplying by it;
- where the model scales attention other than llama.cpp does (Gemma's query_pre_attn_scalar), the ratio is folded
  into the queries (the q norm's weight when there is one, else the q projection's rows);
- a tied LM head is left out; an untied one is refused where llama.cpp's architecture has no output tensor.
"""

from __future__ import annotations

import torch

from tunesmith.errors import ModelError
from tunesmith.export.gguf_arch import NORM_ROPE_ARCHS, llama3_rope_factors, llamacpp_attention_scale, rope_type

BLOCK = 32  # q8_0 and q4_0 quantise runs of 32 values along a row


def rotary_interleave(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """HF's q/k row order (each head: first halves, then second halves) → llama.cpp's (pairs interleaved)."""
    half = weight.shape[0] // heads // 2
    return weight.reshape(heads, 2, half, *weight.shape[1:]).transpose(1, 2).reshape(weight.shape)


def norm_offset(module, weight: torch.Tensor) -> float:
    """0 where the norm multiplies by its weight, 1 where by (1 + weight): read off its output on a probe whose
    mean is 0 and root mean square 1, where either kind of norm returns scale * probe (+ bias)."""
    if weight.ndim != 1 or weight.shape[0] % 2:
        return 0.0
    probe = torch.ones_like(weight, dtype=torch.float32)
    probe[1::2] = -1
    with torch.no_grad():
        out = module(probe.to(weight.dtype)[None]).float()[0]
    bias = getattr(module, "bias", None)
    scale = (out - (bias.float() if bias is not None else 0)) * probe
    weight = weight.float()
    if torch.allclose(scale, weight, atol=1e-3, rtol=1e-3):
        return 0.0
    if torch.allclose(scale, weight + 1, atol=1e-3, rtol=1e-3):
        return 1.0
    raise ModelError(f"GGUF export: the norm {type(module).__name__} scales neither by its weight nor by 1 + weight; "
                     "llama.cpp has no such norm. Use --format hf")


def _query_scale(model, arch_name: str) -> float:
    """What the queries must be multiplied by so that llama.cpp's attention scale gives the model's."""
    theirs = llamacpp_attention_scale(model.config, arch_name)
    ours = next((m.scaling for name, m in model.named_modules() if hasattr(m, "scaling")
                 and name.endswith(("self_attn", "attn"))), theirs)
    return float(ours) / theirs


def _transposed_conv1d_weights(model) -> set[str]:
    from transformers.pytorch_utils import Conv1D

    return {f"{name}.weight" for name, m in model.named_modules() if isinstance(m, Conv1D)}


def named_tensors(model, arch, arch_name: str):
    """(gguf name, float32 tensor) for every weight, in llama.cpp's layout."""
    from gguf import MODEL_TENSOR, MODEL_TENSORS, TENSOR_NAMES, get_tensor_name_map

    config = model.config
    names = get_tensor_name_map(arch, config.num_hidden_layers)
    modules = dict(model.named_modules())
    transposed = _transposed_conv1d_weights(model)
    tied = getattr(config, "tie_word_embeddings", False)
    q_scale = _query_scale(model, arch_name)
    has_q_norm = MODEL_TENSOR.ATTN_Q_NORM in MODEL_TENSORS[arch]
    heads = {MODEL_TENSOR.ATTN_Q: config.num_attention_heads,
             MODEL_TENSOR.ATTN_K: getattr(config, "num_key_value_heads", None) or config.num_attention_heads}
    if rope_type(config) == "llama3":
        if MODEL_TENSOR.ROPE_FREQS not in MODEL_TENSORS[arch]:
            raise ModelError(f"GGUF export: llama.cpp's {arch_name} takes no llama3 rope scaling (no rope_freqs "
                             "tensor). Use --format hf")
        yield TENSOR_NAMES[MODEL_TENSOR.ROPE_FREQS] + ".weight", torch.from_numpy(llama3_rope_factors(config))
    head = model.get_output_embeddings()
    for hf_name, tensor in model.named_parameters():
        if tied and hf_name == "lm_head.weight":
            continue
        stem, _, suffix = hf_name.rpartition(".")
        found = names.get_type_and_name(stem)
        if found is None and head is not None and modules.get(stem) is head:
            found = MODEL_TENSOR.OUTPUT, TENSOR_NAMES[MODEL_TENSOR.OUTPUT]
        if found is None:
            raise ModelError(f"GGUF export: the gguf package's {arch_name} tensor map has no name for {hf_name!r}. "
                             "Use --format hf")
        kind, gguf_stem = found
        if kind not in MODEL_TENSORS[arch]:
            raise ModelError(f"GGUF export: llama.cpp's {arch_name} has no {TENSOR_NAMES[kind]} tensor (this "
                             f"model's {hf_name}: an untied head where llama.cpp's is the embedding?). Use --format hf")
        tensor = tensor.detach().float()
        if "NORM" in kind.name and suffix == "weight":  # probed where the norm lives, written from the CPU
            tensor = tensor + norm_offset(modules[stem], tensor)
        tensor = tensor.cpu()
        if hf_name in transposed:
            tensor = tensor.t().contiguous()
        if q_scale != 1.0 and (kind == MODEL_TENSOR.ATTN_Q_NORM if has_q_norm else kind == MODEL_TENSOR.ATTN_Q):
            tensor = tensor * q_scale
        if kind in heads and arch_name in NORM_ROPE_ARCHS:
            tensor = rotary_interleave(tensor, heads[kind])
        yield f"{gguf_stem}.{suffix}", tensor


def quantised(tensors, tensor_type):
    """(name, data, ggml type): 1-D tensors (norms, biases, rope factors) stay f32; a matrix whose rows do not split
    into blocks of 32 falls back to f16 under q8_0/q4_0, as llama.cpp does."""
    from gguf import GGMLQuantizationType, quants

    for name, tensor in tensors:
        data = tensor.numpy()
        kind = tensor_type
        if data.ndim == 1:
            kind = GGMLQuantizationType.F32
        elif kind not in (GGMLQuantizationType.F32, GGMLQuantizationType.F16) and data.shape[-1] % BLOCK:
            kind = GGMLQuantizationType.F16
        yield name, quants.quantize(data, kind), kind

