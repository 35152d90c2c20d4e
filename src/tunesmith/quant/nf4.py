"""4-bit storage of frozen linear weights for QLoRA (Dettmers et al., 2023): NF4 or FP4 codes, one absmax scale
per block of 64 weights, optionally the scales themselves quantised to 8 bits ("double quantisation").

This module is the only place that picks and imports the backend. It is bitsandbytes' `Linear4bit`, chosen by
`bench/quant.py` over torchao's NF4Tensor: 12 QLoRA steps on SmolLM2 (same run, same machine, back to back) took
50 s (171 tokens/s) with bitsandbytes against 59 s (146 tokens/s) with torchao, at equal loss and peak RSS within
3 %; bitsandbytes also offers FP4 and optional double quantisation (torchao always double-quantises and needs the
number of scales to be a multiple of its scale block), and runs the same code on CUDA. It is imported on first use
(`backend`): its import takes seconds and logs notes about optional kernels, which the CLI keeps quiet
(cli/libraries.py, where libraries that import it unused get it deferred).
"""

from __future__ import annotations

import sys

import torch
from torch import nn

from tunesmith.errors import ModelError
from tunesmith.kernels.file_mapping import copy_out_of_file
from tunesmith.surgery import replace_module

BLOCK_SIZE = 64  # weights per absmax scale (bitsandbytes' default, as in the QLoRA paper)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def backend():
    """bitsandbytes, imported (run, where a library imported it deferred) on first use."""
    try:
        import bitsandbytes.nn  # noqa: F401  (a submodule: runs the package itself)
    except ImportError:
        raise ModelError("method qlora needs bitsandbytes: pip install -c constraints.txt bitsandbytes") from None
    return sys.modules["bitsandbytes"]


_LAYER_CLASS = []


def layer_class():
    """bitsandbytes' Linear4bit, made to follow autocast as nn.Linear does. Its own forward returns the input's
    dtype, so under bf16 autocast an fp32 residual stream would keep every projection's output, and everything
    saved for backward after it, in fp32 (measured: QLoRA's peak RSS above fp32 LoRA's)."""
    if not _LAYER_CLASS:
        class Linear4bit(backend().nn.Linear4bit):
            def forward(self, x: torch.Tensor) -> torch.Tensor:
                if torch.is_autocast_enabled(x.device.type):
                    x = x.to(torch.get_autocast_dtype(x.device.type))
                return super().forward(x)

        _LAYER_CLASS.append(Linear4bit)
    return _LAYER_CLASS[0]


def is_4bit(module: nn.Module) -> bool:
    bnb_nn = sys.modules.get("bitsandbytes.nn")  # only once bitsandbytes has run: a deferred one stays unrun
    return bnb_nn is not None and isinstance(module, bnb_nn.Linear4bit)


def code_values(quant_type: str = "nf4") -> torch.Tensor:
    """The 16 values a 4-bit code stands for (times the block's absmax), ascending."""
    return backend().functional.get_4bit_type(quant_type, device="cpu").sort().values


def quantize_tensor(weight: torch.Tensor, quant_type: str = "nf4", double_quant: bool = False):
    """(packed uint8 codes, quantisation state) of a weight tensor, blocks taken in row-major order."""
    return backend().functional.quantize_4bit(weight.contiguous(), blocksize=BLOCK_SIZE, quant_type=quant_type,
                                              compress_statistics=double_quant)


def dequantize_tensor(packed: torch.Tensor, state) -> torch.Tensor:
    return backend().functional.dequantize_4bit(packed, state)


def block_absmax(state) -> torch.Tensor:
    """The per-block scales as the dequantiser uses them (after undoing double quantisation)."""
    F = backend().functional
    if state.nested:
        return F.dequantize_blockwise(state.absmax, state.state2).float() + state.offset
    return state.absmax.float()


def unsupported_layers(model: nn.Module) -> list[tuple[str, str]]:
    """(name, type) of layers holding a 2-D weight that 4-bit storage cannot take (e.g. GPT-2's Conv1D). A wrapper
    around an nn.Linear (an adapter layer, its `base_layer`) is stored through that linear."""
    out = []
    for name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        if (isinstance(weight, torch.Tensor) and weight.dim() == 2
                and not isinstance(module, (nn.Linear, nn.Embedding))
                and not isinstance(getattr(module, "base_layer", None), nn.Linear)):
            out.append((name, type(module).__name__))
    return out


def quantizable_layers(model: nn.Module, missing_ok: bool = False) -> list[str]:
    """Every nn.Linear except the output head (its weight is often the tied input embedding) not yet in 4 bits;
    none is an error unless `missing_ok`."""
    names = [n for n, m in model.named_modules() if _quantizable(model, m)]
    bad = unsupported_layers(model)
    if bad:
        name, kind = bad[0]
        raise ModelError(f"4-bit quantisation: layer '{name}' is a {kind}, which cannot be stored in 4 bits "
                         f"(supported: torch.nn.Linear; {len(bad)} such layer(s) in this "
                         f"{type(model).__name__}). Use method lora on this model instead.")
    if not names and not missing_ok:
        raise ModelError(f"4-bit quantisation: {type(model).__name__} has no nn.Linear layer to quantise")
    return names


def _quantizable(model: nn.Module, module: nn.Module) -> bool:
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return isinstance(module, nn.Linear) and module is not head and not is_4bit(module)


def quantizing_place(quant_type: str, double_quant: bool, compute_dtype: str):
    """A `place` for weights.stream_model: each weight `quantize_model` would quantise is stored in 4 bits as it
    loads (the same codes, from the same values), so the full-precision linears are never all held at once."""
    def place(model: nn.Module, name: str):
        module_name, _, attr = name.rpartition(".")
        if attr != "weight" or not _quantizable(model, model.get_submodule(module_name)):
            return None

        def take(tensor: torch.Tensor) -> None:
            module = model.get_submodule(module_name)
            linear = nn.Linear(module.in_features, module.out_features, bias=False, device="meta")
            linear.weight = nn.Parameter(tensor, requires_grad=False)
            layer = to_4bit(linear, quant_type, double_quant, compute_dtype)
            if module.bias is not None:  # loaded already, or on the meta device until its tensor arrives
                layer.bias = nn.Parameter(module.bias.detach(), requires_grad=False)
            replace_module(model, module_name, layer)

        return take

    return place


def to_4bit(linear: nn.Linear, quant_type: str, double_quant: bool, compute_dtype: str) -> nn.Module:
    """A frozen Linear4bit holding `linear`'s weight in 4 bits, on the same device."""
    layer = _frozen_4bit(linear, quant_type, double_quant, compute_dtype)
    if not _GRADIENT_CHECKED:
        _check_gradient_flows(quant_type, double_quant)
    return layer


def _frozen_4bit(linear: nn.Linear, quant_type: str, double_quant: bool, compute_dtype: str) -> nn.Module:
    bnb = backend()
    w = linear.weight.detach()
    layer = layer_class()(linear.in_features, linear.out_features, bias=linear.bias is not None,
                              compute_dtype=DTYPES[compute_dtype], compress_statistics=double_quant,
                              quant_type=quant_type, device="meta")
    layer.weight = bnb.nn.Params4bit(w, requires_grad=False, compress_statistics=double_quant,
                                     quant_type=quant_type, blocksize=BLOCK_SIZE, module=layer)
    if linear.bias is not None:
        layer.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
    _keep_one_layout(layer)
    return layer.to(w.device)


# bitsandbytes 0.50.2 repacks the weight for a bf16 CPU kernel on the first eval-mode forward; that kernel has no
# backward, so every later training step silently drops the gradient below the layer. Its switch is this attribute
# (not public API: setting it cannot fail, even where bitsandbytes no longer reads it, so both are checked).
_CPU_REPACK_SWITCH = "support_avx512bf16_for_cpu"
_GRADIENT_CHECKED = False


def _broken_backend(what: str) -> ModelError:
    return ModelError(f"4-bit layers: {what} with bitsandbytes {getattr(backend(), '__version__', '?')}, so training "
                      "through them would silently lose the gradient below each layer on CPU. Install the tested "
                      "version (pip install -c constraints.txt bitsandbytes, i.e. bitsandbytes==0.50.2), or use "
                      "method lora instead of qlora")


def _keep_one_layout(layer: nn.Module) -> None:
    if not hasattr(layer, _CPU_REPACK_SWITCH):
        raise _broken_backend(f"Linear4bit has no '{_CPU_REPACK_SWITCH}' switch to keep its CPU weight layout")
    setattr(layer, _CPU_REPACK_SWITCH, False)


def _check_gradient_flows(quant_type: str, double_quant: bool) -> None:
    """Once per process: a 4-bit layer that has run an inference forward (where bitsandbytes would repack it)
    still passes the exact gradient x ↦ g·W to its input afterwards."""
    global _GRADIENT_CHECKED
    g = torch.Generator().manual_seed(0)
    linear = nn.Linear(128, 64, bias=False)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(64, 128, generator=g))
    layer = _frozen_4bit(linear, quant_type, double_quant, "float32").eval()
    expected = torch.ones(3, 64) @ dequantized_weight(layer)
    x = torch.randn(3, 128, generator=g)
    with torch.no_grad():
        layer(x)
    layer.train()
    x.requires_grad_(True)
    out = layer(x)
    if out.requires_grad:
        out.sum().backward()
    if x.grad is None or not torch.allclose(x.grad, expected, atol=1e-3, rtol=1e-3):
        raise _broken_backend("a Linear4bit passes no (or a wrong) gradient to its input after an inference forward")
    _GRADIENT_CHECKED = True


def quantize_model(model: nn.Module, quant_type: str = "nf4", double_quant: bool = True,
                   compute_dtype: str = "float32", keep=lambda name: False) -> list[str]:
    """Replace every quantisable linear layer but those `keep` names by its 4-bit version; returns their names."""
    names = [name for name in quantizable_layers(model) if not keep(name)]
    for name in names:
        replace_module(model, name, to_4bit(model.get_submodule(name), quant_type, double_quant, compute_dtype))
    copy_out_of_file(p for p in model.parameters() if p.dtype.is_floating_point)  # the 4-bit codes are new
    return names


def dequantized_weight(layer: nn.Module) -> torch.Tensor:
    return dequantize_tensor(layer.weight.data, layer.weight.quant_state).float()


def to_linear(layer: nn.Module, dtype: torch.dtype = torch.float32) -> nn.Linear:
    """A plain nn.Linear holding the dequantised weight of a 4-bit layer."""
    w = dequantized_weight(layer)
    linear = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None, device="meta")
    linear.weight = nn.Parameter(w.to(dtype), requires_grad=False)
    if layer.bias is not None:
        linear.bias = nn.Parameter(layer.bias.detach().to(dtype), requires_grad=False)
    return linear


def dequantize_model(model: nn.Module, dtype: torch.dtype = torch.float32) -> list[str]:
    """Replace every 4-bit layer by a plain nn.Linear with its dequantised weight (inside LoRA wrappers too)."""
    names = [n for n, m in model.named_modules() if is_4bit(m)]
    for name in names:
        replace_module(model, name, to_linear(model.get_submodule(name), dtype))
    return names


def weight_bytes(model: nn.Module) -> int:
    """Bytes of the stored weights: packed codes and scales for 4-bit layers, plain tensors otherwise."""
    total, seen = 0, set()
    for module in model.modules():
        tensors = list(module.parameters(recurse=False)) + list(module.buffers(recurse=False))
        if is_4bit(module):
            state = module.weight.quant_state
            tensors += [state.absmax] + ([state.state2.absmax, state.state2.code] if state.nested else [])
        for t in tensors:
            if id(t) not in seen:
                seen.add(id(t))
                total += t.numel() * t.element_size()
    return total
