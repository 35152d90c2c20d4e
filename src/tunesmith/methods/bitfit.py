"""BitFit (Ben Zaken et al., 2022): only bias terms train.

Llama-style models have no biases in their linears, so BitFit adds zero-initialised ones to the targeted
layers: the untrained model equals the base. Merging writes a model whose config declares the biases.
"""

from __future__ import annotations

import torch
from torch import nn

from tunesmith.config.methods import BitFitSettings
from tunesmith.errors import ModelError
from tunesmith.methods.base import (check_and_copy, conv1d_class, freeze_all, match_modules, read_adapter,
                                    write_adapter)

disabled = None  # the base itself trains: no switch to the model before training
virtual_tokens = None  # no virtual tokens
PEFT_TYPE = "TUNESMITH_BITFIT"
ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")


def claims(config: dict) -> bool:
    return config.get("peft_type") == PEFT_TYPE


def _add_bias(layer: nn.Linear) -> None:
    w = layer.weight
    layer.bias = nn.Parameter(torch.zeros(layer.out_features, device=w.device, dtype=w.dtype))


def apply(model: nn.Module, settings: BitFitSettings) -> None:
    freeze_all(model)
    for name in match_modules(model, settings.target_modules, (nn.Linear, conv1d_class()), "bitfit"):
        layer = model.get_submodule(name)
        if layer.bias is None:
            _add_bias(layer)
        layer.bias.requires_grad_(True)


def save(model: nn.Module, settings: BitFitSettings, folder, base_model: str) -> None:
    tensors = {n: p for n, p in model.named_parameters() if p.requires_grad}
    write_adapter(folder, {"peft_type": PEFT_TYPE, "base_model_name_or_path": base_model,
                           "target_modules": settings.target_modules}, tensors)


def load(model: nn.Module, folder) -> BitFitSettings:
    config, tensors = read_adapter(folder)
    settings = BitFitSettings(target_modules=config["target_modules"])
    apply(model, settings)
    check_and_copy(folder, {n: p for n, p in model.named_parameters() if p.requires_grad}, tensors)
    return settings


def merge(model: nn.Module) -> None:
    """The biases already live in the linears."""


def unload(model: nn.Module) -> nn.Module:
    """Make the config declare the added biases (zeros on untargeted siblings) so bare transformers loads them."""
    config = model.config
    if not (hasattr(config, "attention_bias") and hasattr(config, "mlp_bias")):
        raise ModelError(f"{type(model).__name__}: its config cannot declare linear biases, so BitFit biases "
                         "cannot be merged; load the adapter with --adapter instead")
    for flag, family in (("attention_bias", ATTENTION), ("mlp_bias", MLP)):
        layers = [m for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.rsplit(".", 1)[-1] in family]
        if any(m.bias is not None for m in layers) and not getattr(config, flag):
            for m in layers:
                if m.bias is None:
                    _add_bias(m)
            setattr(config, flag, True)
    return model
