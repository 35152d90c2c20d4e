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


BIAS_FLAGS = ("attention_bias", "mlp_bias")  # the config switches transformers' architectures give linear biases by


def _biased_linears(model: nn.Module) -> set[str]:
    return {n for n, m in model.named_modules() if isinstance(m, (nn.Linear, conv1d_class())) and m.bias is not None}


def _biased(config) -> set[str]:
    """The linears with a bias in a model built from `config` (built on the meta device: no memory)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return _biased_linears(AutoModelForCausalLM.from_config(config))


def unload(model: nn.Module) -> nn.Module:
    """Make the config declare the added biases (zeros on untargeted siblings) so bare transformers loads them.

    Which switch gives which layers a bias is read from the architecture itself: the model is built from its config
    with each of BIAS_FLAGS the config has turned on, on the meta device. Biases the base already had (GPT-2's,
    Qwen2's q/k/v) need nothing; an added bias no switch declares is refused, naming the layer."""
    import copy

    config = model.config
    has = _biased_linears(model)
    undeclared = has - _biased(config)
    if not undeclared:
        return model
    declared = copy.deepcopy(config)
    for flag in BIAS_FLAGS:
        if not hasattr(config, flag) or getattr(config, flag):
            continue
        trial = copy.deepcopy(declared)
        setattr(trial, flag, True)
        if _biased(trial) & undeclared:
            declared = trial
    covered = _biased(declared)
    if undeclared - covered:
        missing = sorted(undeclared - covered)
        raise ModelError(f"{type(model).__name__}: its config cannot declare the BitFit biases of {missing[0]}"
                         f"{f' and {len(missing) - 1} more layers' if len(missing) > 1 else ''}, so they cannot be "
                         "merged into a model transformers loads; load the adapter with --adapter instead")
    for name in sorted(covered - has):
        _add_bias(model.get_submodule(name))
    for flag in BIAS_FLAGS:
        if getattr(declared, flag, False) != getattr(config, flag, False):
            setattr(config, flag, True)
    return model
