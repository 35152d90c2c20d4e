"""What LoHa and LoKr share (PEFT's LyCORIS family): a linear holding named adapters whose update ΔW, of the base
weight's whole shape, is built from small factors at every forward, y = W0·x + b + ΔW·x; PEFT's two training-time
dropouts on it; and the adapter files in PEFT's format (keys `base_model.model.<module>.<factor name>`).

Dropouts, as PEFT applies them while training: `module_dropout` skips a layer's ΔW for a whole forward with that
probability; `rank_dropout` zeroes each output row of ΔW with that probability, the kept rows rescaled by one over the
kept fraction where the method says so (LoHa always, LoKr with rank_dropout_scale).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from tunesmith.errors import ModelError
from tunesmith.methods.base import (AdapterLayer, adapter_layers, adapter_targets, check_and_copy, read_adapter,
                                    set_weight_out_in, weight_out_in, wrapped, write_adapter)

PEFT_PREFIX = "base_model.model."
DEFAULT = "default"
# PEFT config keys that tunesmith cannot honour: a saved adapter with any of them set is refused on load
UNSUPPORTED = ("rank_pattern", "alpha_pattern", "modules_to_save", "layers_to_transform", "exclude_modules")


class LycorisLinear(AdapterLayer):
    """A linear with named LyCORIS adapters; a subclass names its factors (`FACTORS`, PEFT's parameter names) and
    builds ΔW from them (`product`)."""

    FACTORS: tuple[str, ...] = ()

    def __init__(self, base_layer: nn.Linear):
        super().__init__(base_layer)
        for factor in self.FACTORS:
            setattr(self, factor, nn.ParameterDict())
        self.scaling: dict[str, float] = {}
        self.rank_dropout: dict[str, float] = {}
        self.module_dropout: dict[str, float] = {}
        self.rank_dropout_scale: dict[str, bool] = {}

    def names(self) -> list[str]:
        return list(self.scaling)

    def product(self, name: str) -> torch.Tensor:
        """ΔW / scaling as [out, in], from adapter `name`'s factors."""
        raise NotImplementedError

    def add_factors(self, name: str, factors: dict[str, torch.Tensor], scaling: float, rank_dropout: float,
                    module_dropout: float, rank_dropout_scale: bool) -> None:
        """Hold adapter `name` with these (initialised, fp32) factors by PEFT name, and make it the active one."""
        self.check_new_name(name, getattr(self, self.FACTORS[0]))
        device = self.base_layer.weight.device
        for factor, value in factors.items():
            getattr(self, factor)[name] = nn.Parameter(value.to(device))
        self.scaling[name], self.rank_dropout[name] = scaling, rank_dropout
        self.module_dropout[name], self.rank_dropout_scale[name] = module_dropout, rank_dropout_scale
        self.active = name

    def factors(self, name: str) -> dict[str, nn.Parameter]:
        return {f: getattr(self, f)[name] for f in self.FACTORS if name in getattr(self, f)}

    def remove_adapter(self, name: str) -> None:
        self.unmerge(name)
        for factor in self.factors(name):
            del getattr(self, factor)[name]
        for table in (self.scaling, self.rank_dropout, self.module_dropout, self.rank_dropout_scale):
            del table[name]
        if self.active == name:
            self.active = None

    def delta_weight(self, name: str) -> torch.Tensor:
        """ΔW as [out, in], built in fp32 also under autocast (the product taking it casts it as it casts W0)."""
        device = self.base_layer.weight.device.type
        with torch.autocast(device, enabled=False):
            return self.product(name) * self.scaling[name]

    def fold(self, name: str, inverse: bool) -> None:
        w = weight_out_in(self.base_layer)
        delta = self.delta_weight(name).to(w.dtype)
        set_weight_out_in(self.base_layer, w - delta if inverse else w + delta)

    def training_delta(self, name: str) -> torch.Tensor:
        """ΔW with rank dropout applied (a mask over output rows, drawn on the CPU as PEFT draws it)."""
        delta = self.delta_weight(name)
        p = self.rank_dropout[name]
        if p == 0:
            return delta
        keep = (torch.rand(delta.shape[0]) > p).to(delta.dtype)
        if self.rank_dropout_scale[name] and keep.any():
            keep /= keep.mean()
        return delta * keep.to(delta.device).unsqueeze(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        name = self.active
        out = self.base_layer(x)
        if name is None or name in self.merged:
            return out
        if not self.training:
            delta = self.delta_weight(name)
        elif self.module_dropout[name] and not torch.rand(1) > self.module_dropout[name]:
            # skipped for this forward, its factors kept in the graph with zero gradients: DDP expects a gradient
            # for every trained parameter at every step, and each rank skips other layers
            return out + 0 * sum(f.sum() for f in self.factors(name).values()).to(out.dtype)
        else:
            delta = self.training_delta(name)
        h = x if torch.is_autocast_enabled(x.device.type) else x.to(delta.dtype)
        return out + F.linear(h, delta).to(out.dtype)


def lycoris_apply(model: nn.Module, settings, adapter_name: str, layer_cls: type[LycorisLinear], make_factors,
                  rank_dropout_scale: bool) -> dict[str, LycorisLinear]:
    """Freeze the model and add adapter `adapter_name` to every target of `settings`: `make_factors(in, out)` gives
    its initialised factors by PEFT name; `settings` its scaling alpha/r and dropouts."""
    for name in adapter_targets(model, settings.target_modules, adapter_name, layer_cls):
        layer = wrapped(model, name, layer_cls)
        w = layer.base_layer.weight
        factors = make_factors(w.shape[1], w.shape[0])
        layer.add_factors(adapter_name, factors, settings.alpha / settings.r, settings.rank_dropout,
                          settings.module_dropout, rank_dropout_scale)
    return adapter_layers(model, layer_cls)


def adapter_tensors(model: nn.Module, layer_cls: type[LycorisLinear], adapter_name: str = DEFAULT
                    ) -> dict[str, torch.Tensor]:
    return {f"{PEFT_PREFIX}{name}.{factor}": tensor
            for name, layer in adapter_layers(model, layer_cls).items()
            for factor, tensor in layer.factors(adapter_name).items()}


def peft_config(peft_type: str, settings, base_model: str, targets: list[str], extra: dict) -> dict:
    """PEFT's LoHaConfig / LoKrConfig as a dict."""
    return {
        "peft_type": peft_type,
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": settings.r,
        "alpha": settings.alpha,
        "rank_dropout": settings.rank_dropout,
        "module_dropout": settings.module_dropout,
        "target_modules": targets,
        "init_weights": settings.init_weights,
        "use_effective_conv2d": False,  # PEFT reads it for convolutions only
        "inference_mode": True,
        "rank_pattern": {},
        "alpha_pattern": {},
        "exclude_modules": None,
        "layers_to_transform": None,
        "layers_pattern": None,
        "modules_to_save": None,
        **extra,
    }


def save_adapter(model: nn.Module, layer_cls: type[LycorisLinear], peft_type: str, settings, folder,
                 base_model: str, adapter_name: str, extra: dict) -> None:
    layers = {n: l for n, l in adapter_layers(model, layer_cls).items() if adapter_name in l.names()}
    targets = sorted({n.rsplit(".", 1)[-1] for n in layers})
    write_adapter(folder, peft_config(peft_type, settings, base_model, targets, extra),
                  adapter_tensors(model, layer_cls, adapter_name))


def read_settings(folder, peft_type: str, settings_cls, extra_keys: tuple[str, ...]):
    """(settings, tensors) of a saved adapter of `peft_type` (ours or PEFT's); options tunesmith cannot honour are
    refused with their names."""
    config, tensors = read_adapter(folder)
    if config.get("peft_type") != peft_type:
        raise ModelError(f"{folder}: adapter type is {config.get('peft_type')!r}, not {peft_type}")
    bad = [k for k in UNSUPPORTED if config.get(k)]
    if bad:
        raise ModelError(f"{folder}/adapter_config.json: {peft_type} options not supported yet: {', '.join(bad)}")
    keys = ("r", "alpha", "rank_dropout", "module_dropout", "target_modules", "init_weights", *extra_keys)
    options = {k: config[k] for k in keys if config.get(k) is not None}
    if isinstance(options.get("target_modules"), list):
        options["target_modules"] = sorted(options["target_modules"])
    return settings_cls(**options), tensors


def load_adapter(model: nn.Module, folder, layer_cls: type[LycorisLinear], settings, tensors, apply,
                 adapter_name: str):
    apply(model, settings, adapter_name)
    theirs = {k.replace(f".{adapter_name}.", "."): v for k, v in tensors.items()}
    check_and_copy(folder, adapter_tensors(model, layer_cls, adapter_name), theirs)
    return settings
