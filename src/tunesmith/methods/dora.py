"""DoRA (Liu et al., 2024): LoRA with the weight split into magnitude and direction, computed as PEFT does.

    y = m / ||W0 + s·B·A|| ⊙ (W0·x + s·B·A·x) + b

with the row norms ||·|| (one per output feature) detached from the gradient (the paper's §4.3) and m initialised
to the norms at init, where B = 0, so the untrained model is the base. Saved in PEFT's format: a LoRA adapter with
use_dora true and one extra key per layer, `base_model.model.<module>.lora_magnitude_vector`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from tunesmith.config.methods import DoraSettings
from tunesmith.methods import lora
from tunesmith.methods.base import read_adapter, weight_out_in
from tunesmith.methods.lora import (DEFAULT, disabled, merge, save, set_active, unload,  # noqa: F401  (the interface)
                                    unmerge, virtual_tokens)



def claims(config: dict) -> bool:
    return config.get("peft_type") == "LORA" and bool(config.get("use_dora"))


class DoraLinear(lora.LoraLinear):
    reads_base_weight = True  # its weight norm needs the fp32 base (kernels/patches.py, kernels/frozen_bf16.py)

    def __init__(self, base_layer: nn.Linear):
        super().__init__(base_layer)
        self.lora_magnitude_vector = nn.ParameterDict()
        self.merged_norm: dict[str, torch.Tensor] = {}

    def add_adapter(self, name: str, r: int, alpha: float, dropout: float, rslora: bool) -> None:
        super().add_adapter(name, r, alpha, dropout, rslora)
        self.lora_magnitude_vector[name] = nn.Parameter(self.weight_norm(name))

    @torch.no_grad()
    def keep_initial(self, name: str, a0: torch.Tensor, b0: torch.Tensor) -> None:
        """As LoRA's, and m from the residual base plus the initial s·B0·A0 (W up to rounding), as PEFT orders it."""
        super().keep_initial(name, a0, b0)
        self.lora_magnitude_vector[name].copy_(self.weight_norm(name))

    def remove_adapter(self, name: str) -> None:
        super().remove_adapter(name)
        del self.lora_magnitude_vector[name]

    @torch.no_grad()
    def weight_norm(self, name: str) -> torch.Tensor:
        """||W0 + s·B·A|| per output feature, in float32 even under autocast (faster there too)."""
        w = weight_out_in(self.base_layer)
        with torch.autocast(w.device.type, enabled=False):
            return torch.linalg.norm(w.float() + self.delta_weight(name), dim=1)

    def adapter_tensors(self, name: str) -> dict[str, torch.Tensor]:
        return {**super().adapter_tensors(name), "lora_magnitude_vector": self.lora_magnitude_vector[name]}

    def merged_weight(self, name: str) -> torch.Tensor:
        # Unmerging cannot recompute the norm from the merged weight, so it is kept.
        self.merged_norm[name] = norm = self.weight_norm(name)
        factor = (self.lora_magnitude_vector[name] / norm).unsqueeze(1)
        return factor * (weight_out_in(self.base_layer).float() + self.delta_weight(name))

    def unmerged_weight(self, name: str) -> torch.Tensor:
        factor = (self.lora_magnitude_vector[name] / self.merged_norm.pop(name)).unsqueeze(1)
        return weight_out_in(self.base_layer).float() / factor - self.delta_weight(name)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.rows is not None:
            return self.forward_rows(x)
        name = self.active
        if name is None or name in self.merged:
            return self.base_output(x)
        out = self.base_layer(x)
        dropout = self.lora_dropout[name]
        if isinstance(dropout, nn.Identity) or not self.training:
            return self.with_update(name, x, out)
        a, b = self.lora_A[name], self.lora_B[name]
        h = x if torch.is_autocast_enabled(x.device.type) else x.to(a.weight.dtype)
        # as PEFT: the base output keeps the undropped input, the DoRA correction uses the dropped one
        h = dropout(h)
        plain = F.linear(h, weight_out_in(self.base_layer).to(h.dtype))
        scale = self.lora_magnitude_vector[name] / self.weight_norm(name)
        return out + ((scale - 1) * plain + scale * b(a(h)) * self.scaling[name]).to(out.dtype)

    def with_update(self, name: str, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """`out` (the base output for `x`) rescaled and updated as DoRA without dropout."""
        a, b = self.lora_A[name], self.lora_B[name]
        h = x if torch.is_autocast_enabled(x.device.type) else x.to(a.weight.dtype)
        bias = self.base_layer.bias
        plain = out if bias is None else out - bias  # W0·x
        scale = self.lora_magnitude_vector[name] / self.weight_norm(name)
        return out + ((scale - 1) * plain + scale * b(a(h)) * self.scaling[name]).to(out.dtype)


def dora_layers(model: nn.Module) -> dict[str, DoraLinear]:
    return {n: m for n, m in lora.lora_layers(model).items() if isinstance(m, DoraLinear)}


def apply(model: nn.Module, settings: DoraSettings, adapter_name: str = DEFAULT) -> dict[str, DoraLinear]:
    """Freeze the model and add a DoRA adapter to every targeted linear layer."""
    return lora.apply(model, settings, adapter_name, layer_cls=DoraLinear)


def load(model: nn.Module, folder, adapter_name: str = DEFAULT) -> DoraSettings:
    """Load a DoRA adapter (ours or peft's) into `model`; shapes are checked against the base."""
    config, tensors = read_adapter(folder)
    settings = lora.settings_from_peft(config, folder, use_dora=True)
    apply(model, settings, adapter_name)
    lora.copy_saved(model, folder, tensors, adapter_name)
    return settings
