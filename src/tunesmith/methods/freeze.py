"""Freeze: train only chosen base parameters (the last N blocks and/or names matching regexes)."""

from __future__ import annotations

import re

from torch import nn

from tunesmith.config.methods import FreezeSettings
from tunesmith.errors import ConfigError, ModelError
from tunesmith.methods.base import (check_and_copy, freeze_all, quantized_layers, read_adapter,
                                    refuse_training_quantized, write_adapter)

disabled = None  # the base itself trains: no switch to the model before training
virtual_tokens = None  # no virtual tokens
PEFT_TYPE = "TUNESMITH_FREEZE"


def claims(config: dict) -> bool:
    return config.get("peft_type") == PEFT_TYPE


def _block_prefix(model: nn.Module) -> tuple[str, int]:
    layers = model.get_decoder().layers
    for name, module in model.named_modules():
        if module is layers:
            return name, len(layers)
    raise ConfigError("method.last_layers: could not find this model's list of transformer blocks")


def selected(model: nn.Module, settings: FreezeSettings) -> list[str]:
    names = [n for n, _ in model.named_parameters()]
    prefix, n_layers = _block_prefix(model) if settings.last_layers else ("", 0)
    return select_names(names, prefix, n_layers, settings)


def select_names(names: list[str], prefix: str, n_layers: int, settings: FreezeSettings) -> list[str]:
    """The parameter names `settings` trains: those of the last `last_layers` of the `n_layers` blocks named
    `prefix.<i>.`, and those matching any of `patterns`."""
    chosen = set()
    if settings.last_layers:
        if settings.last_layers > n_layers:
            raise ConfigError(f"method.last_layers: {settings.last_layers} > the model's {n_layers} blocks")
        blocks = tuple(f"{prefix}.{i}." for i in range(n_layers - settings.last_layers, n_layers))
        chosen |= {n for n in names if n.startswith(blocks)}
    for pattern in settings.patterns:
        hits = {n for n in names if re.search(pattern, n)}
        if not hits:
            raise ConfigError(f"method.patterns: {pattern!r} matches no parameter; names look like: "
                              + ", ".join(names[:6]))
        chosen |= hits
    return sorted(chosen)


def _block_of(layer: str) -> str:
    """'model.layers.3.mlp.down_proj' → 'model.layers.3.': the block a layer belongs to."""
    match = re.match(r"(.*?\.\d+\.)", layer)
    return match.group(1) if match else layer + "."


def apply(model: nn.Module, settings: FreezeSettings) -> None:
    chosen = selected(model, settings)
    refuse_training_quantized("freeze", [q for q in quantized_layers(model)
                                         if any(n.startswith(_block_of(q)) for n in chosen)
                                         or any(re.search(p, q + ".weight") for p in settings.patterns)])
    freeze_all(model)
    params = dict(model.named_parameters())
    for name in chosen:
        params[name].requires_grad_(True)


def save(model: nn.Module, settings: FreezeSettings, folder, base_model: str) -> None:
    tensors = {n: p for n, p in model.named_parameters() if p.requires_grad}
    config = {"peft_type": PEFT_TYPE, "base_model_name_or_path": base_model,
              "last_layers": settings.last_layers, "patterns": settings.patterns}
    write_adapter(folder, config, tensors)


def load(model: nn.Module, folder) -> FreezeSettings:
    config, tensors = read_adapter(folder)
    if not claims(config):
        raise ModelError(f"{folder}: not a freeze adapter")
    settings = FreezeSettings(last_layers=config.get("last_layers"), patterns=config.get("patterns") or [])
    apply(model, settings)
    check_and_copy(folder, {n: p for n, p in model.named_parameters() if p.requires_grad}, tensors)
    return settings


def merge(model: nn.Module) -> None:
    """The trained tensors already are base weights."""


def unload(model: nn.Module) -> nn.Module:
    return model
