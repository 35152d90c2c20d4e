"""(IA)³ (Liu et al., 2022): learned vectors, ones at init, that rescale a layer's output, or for feedforward
layers its input: y = l ⊙ (W·x + b), or y = W·(l ⊙ x) + b.

Saved in PEFT's format: keys `base_model.model.<module>.ia3_l`, shaped (out, 1) or for feedforward layers (1, in),
config with peft_type IA3, target_modules and feedforward_modules.
"""

from __future__ import annotations

import re

import torch
from torch import nn

from tunesmith.config.methods import IA3Settings
from tunesmith.errors import ConfigError, ModelError
from tunesmith.methods.base import (AdapterLayer, adapter_functions, adapter_layers, adapter_targets, check_and_copy,
                                    read_adapter, wrapped, write_adapter)

PEFT_PREFIX = "base_model.model."
DEFAULT = "default"


def claims(config: dict) -> bool:
    return config.get("peft_type") == "IA3"


class IA3Linear(AdapterLayer):
    METHOD = "ia3"

    def __init__(self, base_layer: nn.Linear, feedforward: bool):
        super().__init__(base_layer)
        self.feedforward = feedforward
        self.ia3_l = nn.ParameterDict()

    def names(self) -> list[str]:
        return list(self.ia3_l)

    def add_adapter(self, name: str) -> None:
        self.check_new_name(name, self.ia3_l)
        base = self.base_layer
        shape = (1, base.in_features) if self.feedforward else (base.out_features, 1)
        self.ia3_l[name] = nn.Parameter(torch.ones(shape, device=base.weight.device, dtype=torch.float32))
        self.active = name

    def remove_adapter(self, name: str) -> None:
        self.unmerge(name)
        del self.ia3_l[name]
        if self.active == name:
            self.active = None

    def fold(self, name: str, inverse: bool) -> None:
        """Multiply (or divide) the weight's rows, or for feedforward its columns; the bias goes with the rows."""
        w, bias, vector = self.base_layer.weight, self.base_layer.bias, self.ia3_l[name]
        w.data = (w / vector if inverse else w * vector).to(w.dtype)  # (out, 1) broadcasts over rows, (1, in) columns
        if bias is not None and not self.feedforward:
            v = vector.flatten()
            bias.data = (bias / v if inverse else bias * v).to(bias.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        name = self.active
        if name is None or name in self.merged:
            return self.base_layer(x)
        vector = self.ia3_l[name].flatten()
        if self.feedforward:
            return self.base_layer((x * vector).to(x.dtype))
        out = self.base_layer(x)
        return (out * vector).to(out.dtype)


def ia3_layers(model: nn.Module) -> dict[str, IA3Linear]:
    return adapter_layers(model, IA3Linear)


set_active, disabled, merge, unmerge, unload, delete_adapter = adapter_functions(IA3Linear, "(IA)³ vectors")
virtual_tokens = None  # no virtual tokens


def _is_feedforward(name: str, patterns: list[str] | str) -> bool:
    if isinstance(patterns, str):
        return re.fullmatch(patterns, name) is not None
    return any(name == p or name.endswith("." + p) for p in patterns)


def apply(model: nn.Module, settings: IA3Settings, adapter_name: str = DEFAULT) -> dict[str, IA3Linear]:
    """Freeze the model and add an (IA)³ vector to every targeted linear layer."""
    names = adapter_targets(model, settings.target_modules, adapter_name, IA3Linear)
    feedforward = {n: _is_feedforward(n, settings.feedforward_modules) for n in names}
    split = ({n.rsplit(".", 1)[-1] for n in names if feedforward[n]}
             & {n.rsplit(".", 1)[-1] for n in names if not feedforward[n]})
    if split:  # PEFT's config tells feedforward layers by the last part of their name only
        raise ConfigError(f"method.feedforward_modules: {sorted(split)} layers are feedforward in some blocks and "
                          "not in others; PEFT's adapter format cannot record that")
    for name in names:
        wrapped(model, name, IA3Linear, feedforward[name]).add_adapter(adapter_name)
    return ia3_layers(model)


def adapter_tensors(model: nn.Module, adapter_name: str = DEFAULT) -> dict[str, torch.Tensor]:
    return {f"{PEFT_PREFIX}{name}.ia3_l": layer.ia3_l[adapter_name]
            for name, layer in ia3_layers(model).items() if adapter_name in layer.ia3_l}


def save(model: nn.Module, settings: IA3Settings, folder, base_model: str, adapter_name: str = DEFAULT) -> None:
    layers = {n: l for n, l in ia3_layers(model).items() if adapter_name in l.ia3_l}
    suffixes = {n: n.rsplit(".", 1)[-1] for n in layers}
    feedforward = {suffixes[n] for n, l in layers.items() if l.feedforward}
    config = {
        "peft_type": "IA3",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "target_modules": sorted(set(suffixes.values())),
        "feedforward_modules": sorted(feedforward),
        "fan_in_fan_out": False,
        "init_ia3_weights": True,
        "inference_mode": True,
        "modules_to_save": None,
    }
    write_adapter(folder, config, adapter_tensors(model, adapter_name))


def settings_from_peft(config: dict, folder) -> IA3Settings:
    if config.get("peft_type") != "IA3":
        raise ModelError(f"{folder}: adapter type is {config.get('peft_type')!r}, not IA3")
    unsupported = {
        "modules_to_save": bool(config.get("modules_to_save")),
        "fan_in_fan_out": bool(config.get("fan_in_fan_out")),
        "exclude_modules": bool(config.get("exclude_modules")),
    }
    bad = [k for k, v in unsupported.items() if v]
    if bad:
        raise ModelError(f"{folder}/adapter_config.json: IA3 options not supported yet: {', '.join(bad)}")
    return IA3Settings(target_modules=config["target_modules"],
                       feedforward_modules=config.get("feedforward_modules") or [])


def load(model: nn.Module, folder, adapter_name: str = DEFAULT) -> IA3Settings:
    """Load an (IA)³ adapter (ours or peft's) into `model`; shapes are checked against the base."""
    config, tensors = read_adapter(folder)
    settings = settings_from_peft(config, folder)
    apply(model, settings, adapter_name)
    theirs = {k.replace(f".{adapter_name}.", "."): v for k, v in tensors.items()}
    check_and_copy(folder, adapter_tensors(model, adapter_name), theirs)
    return settings
