"""Quantise a causal LM's decoder blocks to int4, one block after another.

GPTQ runs the calibration windows through the model once to catch the inputs of the first block, then for each
block: feed it those inputs with hooks that accumulate every linear layer's Hessian, quantise its linear layers,
and feed it again, now quantised, to produce the inputs of the next block. So each block is calibrated on what
the already-quantised blocks below it really output. Round-to-nearest needs no data.
"""

from __future__ import annotations

import time

import torch
from torch import nn

from tunesmith.errors import ModelError
from tunesmith.quant import gptq, rtn
from tunesmith.quant.linear import Int4Linear
from tunesmith.quant.nf4 import unsupported_layers
from tunesmith.surgery import replace_module

METHODS = ("gptq", "rtn")


class _StopForward(Exception):
    pass


def decoder_blocks(model: nn.Module) -> nn.ModuleList:
    """The model's stack of decoder layers: `model.get_decoder().layers`, else the one ModuleList as long as
    `config.num_hidden_layers`; never merely the longest list (a mixture-of-experts layer's experts can be longer)."""
    n_layers = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    get_decoder = getattr(model, "get_decoder", None)
    decoder = get_decoder() if callable(get_decoder) else None
    layers = getattr(decoder, "layers", None)
    if isinstance(layers, nn.ModuleList) and len(layers) and n_layers in (None, len(layers)):
        return layers
    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList) and len(m)]
    if n_layers:
        same_length = [m for m in lists if len(m) == n_layers]
        if len(same_length) == 1:
            return same_length[0]
    found = ", ".join(f"'{name}' ({len(m)})" for name, m in model.named_modules() if m in lists) or "none"
    raise ModelError(f"int4 quantisation: cannot tell which module list of {type(model).__name__} holds its decoder "
                     f"layers: expected model.get_decoder().layers, or one ModuleList of config.num_hidden_layers = "
                     f"{n_layers} blocks; module lists found: {found}")


def block_linears(model: nn.Module) -> dict[str, nn.Linear]:
    """Every linear layer inside the decoder blocks, checked to be quantisable (the head and embeddings stay)."""

    blocks = decoder_blocks(model)
    prefix = next(n for n, m in model.named_modules() if m is blocks)
    bad = unsupported_layers(blocks)
    if bad:
        raise ModelError(f"int4 quantisation: layer '{prefix}.{bad[0][0]}' is a {bad[0][1]}, which cannot be "
                         "quantised here (supported: torch.nn.Linear)")
    found = {f"{prefix}.{n}": m for n, m in blocks.named_modules() if isinstance(m, nn.Linear)
             and not isinstance(m, Int4Linear)}
    if not found:
        raise ModelError(f"int4 quantisation: {type(model).__name__} has no nn.Linear layer in its blocks")
    for name, layer in found.items():
        if layer.in_features % 2:
            raise ModelError(f"int4 quantisation: {name} has an odd in_features ({layer.in_features}); two int4 "
                             "codes are packed per byte along the input dimension")
    return found


def min_calibration_tokens(model: nn.Module) -> tuple[int, str]:
    """The widest input among the layers to quantise: fewer calibration tokens leave its Hessian singular."""
    name, layer = max(block_linears(model).items(), key=lambda kv: kv[1].in_features)
    return layer.in_features, f" (the input width of {name})"


def _to_int4(layer: nn.Linear, codes, scales, zeros, group_size: int) -> Int4Linear:
    return Int4Linear.from_codes(codes, scales, zeros, group_size, layer.bias)


def _first_block_inputs(model: nn.Module, block: nn.Module, calib: torch.Tensor, batch: int) -> list:
    caught = []

    def catch(module, args, kwargs):
        caught.append((args, kwargs))
        raise _StopForward

    handle = block.register_forward_pre_hook(catch, with_kwargs=True)
    try:
        for i in range(0, len(calib), batch):
            try:
                model(input_ids=calib[i:i + batch], use_cache=False)
            except _StopForward:
                pass
    finally:
        handle.remove()
    return caught


def _run_block(block: nn.Module, inputs: list) -> list:
    outputs = []
    for args, kwargs in inputs:
        out = block(*args, **kwargs)
        out = out[0] if isinstance(out, tuple) else out
        outputs.append(((out,) + tuple(args[1:]), kwargs))
    return outputs


def _hessians(block: nn.Module, layers: dict[str, nn.Linear], inputs: list) -> dict[str, gptq.HessianAccumulator]:
    """Each layer's input Hessian over the calibration inputs, the block run batch by batch; layers fed the very
    same tensor (q/k/v, gate/up) share one accumulator."""
    hessians = {n: gptq.HessianAccumulator(m.in_features, m.weight.device) for n, m in layers.items()}
    first_reader: dict[int, tuple[str, torch.Tensor]] = {}  # holding the tensor keeps its id unique in a batch
    shares: dict[str, str] = {}

    def hook(name):
        def accumulate(module, args, output):
            first, _ = first_reader.setdefault(id(args[0]), (name, args[0]))
            if first == name:
                hessians[name].add(args[0])
            else:
                shares[name] = first
        return accumulate

    handles = [m.register_forward_hook(hook(n)) for n, m in layers.items()]
    try:
        for batch in inputs:
            first_reader.clear()
            _run_block(block, [batch])
    finally:
        first_reader.clear()
        for h in handles:
            h.remove()
    return {n: hessians[shares.get(n, n)] for n in layers}


@torch.no_grad()
def quantize_model(model: nn.Module, method: str, group_size: int, calib: torch.Tensor | None = None,
                   damp: float = 0.01, batch: int = 8, progress=None) -> list[str]:
    """Replace every linear layer of the decoder blocks by an Int4Linear (in place); returns their names."""
    if method not in METHODS:
        raise ModelError(f"--method {method}: expected one of {', '.join(METHODS)}")
    targets = block_linears(model)
    if method == "rtn":
        for name, layer in targets.items():
            replace_module(model, name, _to_int4(layer, *rtn.quantize_weight(layer.weight, group_size), group_size))
        return list(targets)
    if calib is None:
        raise ModelError("GPTQ needs calibration data (--calib)")
    blocks = decoder_blocks(model)
    prefix = next(n for n, m in model.named_modules() if m is blocks)
    was_training = model.training
    model.eval()
    inputs = _first_block_inputs(model, blocks[0], calib, batch)
    for i, block in enumerate(blocks):
        started = time.perf_counter()
        mine = {n: m for n, m in targets.items() if n.startswith(f"{prefix}.{i}.")}
        hessians = _hessians(block, mine, inputs)
        quantized = {}
        for name, layer in mine.items():
            codes, scales, zeros = gptq.quantize_weight(layer.weight, hessians[name].H, group_size, damp, name=name)
            quantized[name] = _to_int4(layer, codes, scales, zeros, group_size)
            layer.weight.data = quantized[name].dequantized(layer.weight.dtype)  # what Int4Linear computes with
        del hessians
        inputs = _run_block(block, inputs)
        for name, layer in quantized.items():
            replace_module(model, name, layer)
        if progress:
            progress(i + 1, len(blocks), time.perf_counter() - started)
    model.train(was_training)
    return list(targets)
