"""LoKr (Yeh et al., 2024, LyCORIS; PEFT's LoKrModel): the update of each targeted linear is a Kronecker product,
ΔW = W1 ⊗ W2 · alpha/r, with out = a·b and in = c·d split near their square roots (methods/lokr_shapes.py), W1 (a × c)
and W2 (b × d) each a full matrix or a rank-r pair by PEFT's rule. W1 (or W1a) starts at zero, so the untrained
model is the base; with init_weights "lycoris", W2 (or W2b) does instead.

Saved in PEFT's format: keys `base_model.model.<module>.lokr_w1` or `lokr_w1_a`/`lokr_w1_b`, and `lokr_w2` or
`lokr_w2_a`/`lokr_w2_b`, config with peft_type LOKR. Linear layers only (PEFT's LoKr takes no transformers Conv1D
either).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from tunesmith.config.methods import LokrSettings
from tunesmith.methods import lycoris
from tunesmith.methods.base import adapter_functions, adapter_layers
from tunesmith.methods.lokr_shapes import lokr_factors

PEFT_TYPE = "LOKR"
DEFAULT = lycoris.DEFAULT


def claims(config: dict) -> bool:
    return config.get("peft_type") == PEFT_TYPE


class LokrLinear(lycoris.LycorisLinear):
    METHOD = "lokr"
    FACTORS = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b")

    def product(self, name: str) -> torch.Tensor:
        f = self.factors(name)
        w1 = f["lokr_w1"] if "lokr_w1" in f else f["lokr_w1_a"] @ f["lokr_w1_b"]
        w2 = f["lokr_w2"] if "lokr_w2" in f else f["lokr_w2_a"] @ f["lokr_w2_b"]
        return torch.kron(w1, w2)


def initial_factors(in_features: int, out_features: int, settings: LokrSettings) -> dict[str, torch.Tensor]:
    """PEFT's initialisation: Kaiming-uniform factors (a = √5), with W1 (or W1a) zero, or for init_weights "lycoris"
    W2 (or W2b) zero, so ΔW = 0; every factor random with init_weights false."""
    shapes = lokr_factors(in_features, out_features, settings.r, settings.decompose_both, settings.decompose_factor)
    factors = {k: nn.init.kaiming_uniform_(torch.empty(shape), a=math.sqrt(5)) for k, shape in shapes.items()}
    zero = {True: ("lokr_w1", "lokr_w1_a"), "lycoris": ("lokr_w2", "lokr_w2_b"), False: ()}[settings.init_weights]
    for k in zero:
        if k in factors:
            factors[k].zero_()
    return factors


def lokr_layers(model: nn.Module) -> dict[str, LokrLinear]:
    return adapter_layers(model, LokrLinear)


set_active, disabled, merge, unmerge, unload, delete_adapter = adapter_functions(LokrLinear, "LoKr adapters")
virtual_tokens = None  # no virtual tokens


def apply(model: nn.Module, settings: LokrSettings, adapter_name: str = DEFAULT) -> dict[str, LokrLinear]:
    """Freeze the model and add a LoKr adapter to every targeted linear layer."""
    def make(in_features, out_features):
        return initial_factors(in_features, out_features, settings)

    return lycoris.lycoris_apply(model, settings, adapter_name, LokrLinear, make, settings.rank_dropout_scale)


EXTRA = ("decompose_both", "decompose_factor", "rank_dropout_scale")


def save(model: nn.Module, settings: LokrSettings, folder, base_model: str, adapter_name: str = DEFAULT) -> None:
    lycoris.save_adapter(model, LokrLinear, PEFT_TYPE, settings, folder, base_model, adapter_name,
                         {k: getattr(settings, k) for k in EXTRA})


def load(model: nn.Module, folder, adapter_name: str = DEFAULT) -> LokrSettings:
    """Load a LoKr adapter (ours or PEFT's) into `model`; shapes are checked against the base."""
    settings, tensors = lycoris.read_settings(folder, PEFT_TYPE, LokrSettings, EXTRA)
    return lycoris.load_adapter(model, folder, LokrLinear, settings, tensors, apply, adapter_name)
