"""Bottleneck adapters (Houlsby et al., 2019): down-projection, nonlinearity, up-projection, residual,
after the attention output and/or the MLP output of every block. Up-projection starts at zero, so the
untrained model equals the base. They add layers the base architecture lacks: not mergeable.
"""

from __future__ import annotations

import math
from contextlib import contextmanager

import torch
from torch import nn

from tunesmith.config.methods import AdapterSettings
from tunesmith.errors import ModelError
from tunesmith.methods.base import (check_and_copy, freeze_all, match_modules, read_adapter, replace_module,
                                    write_adapter)

merge = unload = None  # AdapterSettings.declaration says why not
virtual_tokens = None  # no virtual tokens
PEFT_TYPE = "TUNESMITH_BOTTLENECK"
PLACEMENTS = {"attention": ["o_proj"], "mlp": ["down_proj"], "both": ["o_proj", "down_proj"]}
ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU}


def claims(config: dict) -> bool:
    return config.get("peft_type") == PEFT_TYPE


class BottleneckAfter(nn.Module):
    """y = h + up(act(down(h))) with h = base_layer(x)."""

    def __init__(self, base_layer: nn.Linear, width: int, activation: str, dropout: float):
        super().__init__()
        self.base_layer = base_layer
        hidden = base_layer.out_features
        device = base_layer.weight.device
        self.adapter_down = nn.Linear(hidden, width, device=device)
        self.adapter_up = nn.Linear(width, hidden, device=device)
        nn.init.kaiming_uniform_(self.adapter_down.weight, a=math.sqrt(5))
        nn.init.zeros_(self.adapter_up.weight)
        nn.init.zeros_(self.adapter_up.bias)
        self.act = ACTIVATIONS[activation]()
        self.dropout = nn.Dropout(dropout) if dropout else nn.Identity()

    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.base_layer(x)
        z = h if torch.is_autocast_enabled(h.device.type) else h.to(self.adapter_down.weight.dtype)
        return h + self.adapter_up(self.dropout(self.act(self.adapter_down(z)))).to(h.dtype)


def apply(model: nn.Module, settings: AdapterSettings) -> None:
    freeze_all(model)
    width = max(1, model.config.hidden_size // settings.reduction_factor)
    for name in match_modules(model, PLACEMENTS[settings.placement]):
        replace_module(model, name, BottleneckAfter(model.get_submodule(name), width, settings.activation,
                                                    settings.dropout))


@contextmanager
def disabled(model: nn.Module):
    """Run the bare base model inside the block: each wrapped layer is swapped for its base layer, then back."""
    wrapped = {n: m for n, m in model.named_modules() if isinstance(m, BottleneckAfter)}
    try:
        for name, module in wrapped.items():
            replace_module(model, name, module.base_layer)
        yield model
    finally:
        for name, module in wrapped.items():
            replace_module(model, name, module)


def save(model: nn.Module, settings: AdapterSettings, folder, base_model: str) -> None:
    tensors = {n: p for n, p in model.named_parameters() if p.requires_grad}
    config = {"peft_type": PEFT_TYPE, "base_model_name_or_path": base_model,
              **settings.model_dump(exclude={"name"})}
    write_adapter(folder, config, tensors)


def load(model: nn.Module, folder) -> AdapterSettings:
    config, tensors = read_adapter(folder)
    if not claims(config):
        raise ModelError(f"{folder}: not a bottleneck adapter")
    settings = AdapterSettings(**{k: config[k] for k in ("reduction_factor", "placement", "activation", "dropout")})
    apply(model, settings)
    check_and_copy(folder, {n: p for n, p in model.named_parameters() if p.requires_grad}, tensors)
    return settings
