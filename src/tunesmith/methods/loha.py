"""LoHa (Hyeon-Woo et al., 2022, FedPara; PEFT's LoHaModel): the update of each targeted linear is the Hadamard
(element-wise) product of two rank-r products, ΔW = (W1a·W1b) ⊙ (W2a·W2b) · alpha/r, of rank up to r² for the
2·r·(in + out) parameters of a rank-2r LoRA. W2b starts at zero, so the untrained model is the base.

Saved in PEFT's format: keys `base_model.model.<module>.hada_w1_a` (out, r), `hada_w1_b` (r, in), `hada_w2_a`,
`hada_w2_b`, config with peft_type LOHA. Linear layers only (PEFT's LoHa takes no transformers Conv1D either).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from tunesmith.config.methods import LohaSettings
from tunesmith.methods import lycoris
from tunesmith.methods.base import adapter_functions, adapter_layers

PEFT_TYPE = "LOHA"
DEFAULT = lycoris.DEFAULT


def claims(config: dict) -> bool:
    return config.get("peft_type") == PEFT_TYPE


class HadamardProduct(torch.autograd.Function):
    """(W1a·W1b) ⊙ (W2a·W2b), keeping only the four factors for backward (each product is recomputed there), not the
    two products of the weight's whole shape plain autograd would keep."""

    @staticmethod
    def forward(ctx, w1a, w1b, w2a, w2b):
        ctx.save_for_backward(w1a, w1b, w2a, w2b)
        return (w1a @ w1b) * (w2a @ w2b)

    @staticmethod
    def backward(ctx, grad):
        w1a, w1b, w2a, w2b = ctx.saved_tensors
        through_1 = grad * (w2a @ w2b)  # ∂/∂(W1a·W1b)
        through_2 = grad * (w1a @ w1b)
        return through_1 @ w1b.T, w1a.T @ through_1, through_2 @ w2b.T, w2a.T @ through_2


class LohaLinear(lycoris.LycorisLinear):
    METHOD = "loha"
    FACTORS = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")

    def product(self, name: str) -> torch.Tensor:
        f = self.factors(name)
        return HadamardProduct.apply(f["hada_w1_a"], f["hada_w1_b"], f["hada_w2_a"], f["hada_w2_b"])


def initial_factors(in_features: int, out_features: int, r: int, init_weights: bool) -> dict[str, torch.Tensor]:
    """PEFT's initialisation: Kaiming-uniform factors (a = √5) and W2b zero, so ΔW = 0; every factor random
    without init_weights."""
    shapes = {"hada_w1_a": (out_features, r), "hada_w1_b": (r, in_features),
              "hada_w2_a": (out_features, r), "hada_w2_b": (r, in_features)}
    factors = {k: nn.init.kaiming_uniform_(torch.empty(shape), a=math.sqrt(5)) for k, shape in shapes.items()}
    if init_weights:
        factors["hada_w2_b"].zero_()
    return factors


def loha_layers(model: nn.Module) -> dict[str, LohaLinear]:
    return adapter_layers(model, LohaLinear)


set_active, disabled, merge, unmerge, unload, delete_adapter = adapter_functions(LohaLinear, "LoHa adapters")
virtual_tokens = None  # no virtual tokens


def apply(model: nn.Module, settings: LohaSettings, adapter_name: str = DEFAULT) -> dict[str, LohaLinear]:
    """Freeze the model and add a LoHa adapter to every targeted linear layer."""
    def make(in_features, out_features):
        return initial_factors(in_features, out_features, settings.r, settings.init_weights)

    return lycoris.lycoris_apply(model, settings, adapter_name, LohaLinear, make, rank_dropout_scale=True)


def save(model: nn.Module, settings: LohaSettings, folder, base_model: str, adapter_name: str = DEFAULT) -> None:
    lycoris.save_adapter(model, LohaLinear, PEFT_TYPE, settings, folder, base_model, adapter_name, {})


def load(model: nn.Module, folder, adapter_name: str = DEFAULT) -> LohaSettings:
    """Load a LoHa adapter (ours or PEFT's) into `model`; shapes are checked against the base."""
    settings, tensors = lycoris.read_settings(folder, PEFT_TYPE, LohaSettings, ())
    return lycoris.load_adapter(model, folder, LohaLinear, settings, tensors, apply, adapter_name)
