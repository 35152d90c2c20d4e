"""LoRA (Hu et al., 2021) and rsLoRA scaling: y = W0·x + s·B·A·dropout(x), with B = 0 at init.

Adapters live in ModuleDicts keyed by adapter name, so several can sit in one model; one is active at a time, or,
for serving, each row of a batch runs through its own adapter (`per_row`).
Saved in PEFT's format: keys `base_model.model.<module>.lora_A.weight`, config with peft_type LORA.
"""

from __future__ import annotations

import math
from contextlib import contextmanager

import torch
from torch import nn

from tunesmith.config.methods import DoraSettings, LoraSettings
from tunesmith.errors import ModelError
from tunesmith.methods import lora_function, lora_init
from tunesmith.methods.base import (AdapterLayer, adapter_functions, adapter_layers, adapter_targets, check_and_copy,
                                    is_conv1d, linear_features, read_adapter, set_weight_out_in, weight_out_in,
                                    wrapped, write_adapter)

PEFT_PREFIX = "base_model.model."
DEFAULT = "default"


def claims(config: dict) -> bool:
    return config.get("peft_type") == "LORA" and not config.get("use_dora")


def lora_scaling(r: int, alpha: float, rslora: bool) -> float:
    return alpha / math.sqrt(r) if rslora else alpha / r


class LoraLinear(AdapterLayer):
    METHOD = "lora"
    TAKES_CONV1D = True
    rows: dict[str, torch.Tensor] | None = None  # set by per_row: the batch rows of each adapter; None: `active` rules

    def __init__(self, base_layer: nn.Linear):
        super().__init__(base_layer)
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self.lora_dropout = nn.ModuleDict()
        self.scaling: dict[str, float] = {}
        self.residual_of: str | None = None  # the adapter whose init (lora_init.py) left the base weight W − s·B0·A0

    def names(self) -> list[str]:
        return list(self.lora_A)

    def add_adapter(self, name: str, r: int, alpha: float, dropout: float, rslora: bool) -> None:
        self.check_new_name(name, self.lora_A)
        if self.residual_of is not None:
            raise ModelError(f"adapter {name!r}: this layer's base weight is the residual of adapter "
                             f"{self.residual_of!r}'s initialisation, so another adapter beside it would see a base "
                             "without its principal part; save that adapter (saving converts it to a plain LoRA on "
                             "the original weights) and load both on the original model")
        w = self.base_layer.weight
        fan_in, fan_out = linear_features(self.base_layer)
        a = nn.Linear(fan_in, r, bias=False, device=w.device, dtype=torch.float32)
        b = nn.Linear(r, fan_out, bias=False, device=w.device, dtype=torch.float32)
        nn.init.kaiming_uniform_(a.weight, a=math.sqrt(5))
        nn.init.zeros_(b.weight)
        self.lora_A[name], self.lora_B[name] = a, b
        self.lora_dropout[name] = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.scaling[name] = lora_scaling(r, alpha, rslora)
        self.active = name

    def keep_initial(self, name: str, a0: torch.Tensor, b0: torch.Tensor) -> None:
        """Adapter `name`'s init moved s·B0·A0 out of the base weight: keep A0 and B0 (frozen, fp32) to put it back."""
        self.register_buffer("lora_A0", a0.detach().float().clone(), persistent=False)
        self.register_buffer("lora_B0", b0.detach().float().clone(), persistent=False)
        self.residual_of = name

    def initial(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(A0, B0) where the base weight is a residual (lora_init.py), else None."""
        return (self.lora_A0, self.lora_B0) if self.residual_of is not None else None

    def initial_delta(self) -> torch.Tensor:
        """s·B0·A0 as [out, in]: what the base weight lacks of the original W."""
        return (self.lora_B0 @ self.lora_A0) * self.scaling[self.residual_of]

    def lacks_initial(self) -> bool:
        """Whether the running base weight is the residual alone: an init moved s·B0·A0 out and the adapter that
        owns it is neither active nor merged, so the forward adds it back."""
        owner = self.residual_of
        return owner is not None and owner != self.active and owner not in self.merged

    def base_output(self, x: torch.Tensor) -> torch.Tensor:
        """The original base's output: the base layer's, plus s·B0·A0·x where its weight is a residual."""
        out = self.base_layer(x)
        if not self.lacks_initial():
            return out
        h = x if torch.is_autocast_enabled(x.device.type) else x.to(self.lora_A0.dtype)
        return out + (((h @ self.lora_A0.t().to(h.dtype)) @ self.lora_B0.t().to(h.dtype))
                      * self.scaling[self.residual_of]).to(out.dtype)

    @torch.no_grad()
    def released(self) -> nn.Module:
        """The base layer alone, holding the original W again where an init left it a residual."""
        if self.residual_of is not None and self.residual_of not in self.merged:
            if not self.base_layer.weight.dtype.is_floating_point:
                raise ModelError("this layer's base weight is stored quantised and holds the residual of a "
                                 "pissa/olora/loftq initialisation; merge the adapter first (merge dequantises it)")
            set_weight_out_in(self.base_layer, weight_out_in(self.base_layer).float() + self.initial_delta())
            self.residual_of = None
        return self.base_layer

    def remove_adapter(self, name: str) -> None:
        self.unmerge(name)
        if name == self.residual_of:
            self.released()
        del self.lora_A[name], self.lora_B[name], self.lora_dropout[name]
        del self.scaling[name]
        if self.active == name:
            self.active = None

    def delta_weight(self, name: str) -> torch.Tensor:
        a, b = self.lora_A[name].weight, self.lora_B[name].weight
        return (b.float() @ a.float()) * self.scaling[name]

    def adapter_tensors(self, name: str) -> dict[str, torch.Tensor]:
        """This adapter's parameters by their PEFT key suffix."""
        return {"lora_A.weight": self.lora_A[name].weight, "lora_B.weight": self.lora_B[name].weight}

    def merged_weight(self, name: str) -> torch.Tensor:
        """W0 + ΔW as [out, in] (whatever the base layer's own layout)."""
        w = weight_out_in(self.base_layer)
        return w + self.delta_weight(name).to(w.dtype)

    def unmerged_weight(self, name: str) -> torch.Tensor:
        w = weight_out_in(self.base_layer)
        return w - self.delta_weight(name).to(w.dtype)

    def fold(self, name: str, inverse: bool) -> None:
        set_weight_out_in(self.base_layer, self.unmerged_weight(name) if inverse else self.merged_weight(name))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.rows is not None:
            return self.forward_rows(x)
        name = self.active
        if name is None or name in self.merged:
            return self.base_output(x)
        a, b = self.lora_A[name], self.lora_B[name]
        dropout = self.lora_dropout[name]
        if lora_function.applies(x, self.base_layer, a.weight, b.weight):
            p = dropout.p if isinstance(dropout, nn.Dropout) and dropout.training else 0.0
            return lora_function.frozen_linear_with_lora(x, self.base_layer, a.weight, b.weight, self.scaling[name], p)
        out = self.base_layer(x)
        h = dropout(x)
        autocast = torch.is_autocast_enabled(h.device.type)
        if not autocast:
            h = h.to(a.weight.dtype)
        low_rank = a(h)
        if out.dtype == low_rank.dtype and (autocast or low_rank.dtype == b.weight.dtype):
            # out + s·(A·h)·Bᵀ in one matrix product: no separate scaling and addition passes over the output
            flat = torch.addmm(out.reshape(-1, out.shape[-1]), low_rank.reshape(-1, low_rank.shape[-1]),
                               b.weight.t(), alpha=self.scaling[name])
            return flat.view(out.shape)
        return out + (b(low_rank) * self.scaling[name]).to(out.dtype)

    def forward_rows(self, x: torch.Tensor) -> torch.Tensor:
        """Inference with each batch row (dim 0) through its own adapter, the rows of none through the base alone."""
        out = self.base_layer(x)
        for name, index in self.rows.items():
            if name in self.lora_A:
                index = index.to(x.device)
                out.index_copy_(0, index, self.with_update(name, x.index_select(0, index), out.index_select(0, index)))
        return out

    def with_update(self, name: str, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """`out` (the base output for `x`) plus the adapter's update, without dropout, in forward's order of operations:
        out + s·(x·Aᵀ)·Bᵀ as one addmm where the dtypes allow it."""
        a, b = self.lora_A[name].weight, self.lora_B[name].weight
        h = x if torch.is_autocast_enabled(x.device.type) else x.to(a.dtype)
        low_rank = torch.mm(h.reshape(-1, h.shape[-1]), a.t())
        flat = out.reshape(-1, out.shape[-1])
        if flat.dtype == low_rank.dtype == b.dtype:
            return flat.addmm(low_rank, b.t(), alpha=self.scaling[name]).view(out.shape)
        return (flat + (torch.mm(low_rank, b.t().to(low_rank.dtype)) * self.scaling[name]).to(out.dtype)).view(out.shape)


def lora_layers(model: nn.Module) -> dict[str, LoraLinear]:
    return adapter_layers(model, LoraLinear)


set_active, disabled, merge, unmerge, unload, delete_adapter = adapter_functions(LoraLinear, "adapters")
virtual_tokens = None  # no virtual tokens


def apply(model: nn.Module, settings: LoraSettings, adapter_name: str = DEFAULT,
          layer_cls: type[LoraLinear] = LoraLinear, quantise: lora_init.Quantiser | None = None
          ) -> dict[str, LoraLinear]:
    """Freeze the model and add an adapter (LoRA, or the variant `layer_cls` is) to every targeted linear layer,
    initialised as settings.init says (lora_init.py; `quantise`: the 4-bit round trip LoftQ fits to)."""
    for name in adapter_targets(model, settings.target_modules, adapter_name, LoraLinear):
        layer = wrapped(model, name, layer_cls)
        layer.add_adapter(adapter_name, settings.r, settings.alpha, settings.dropout, settings.rslora)
        lora_init.initialise(layer, adapter_name, settings, quantise)
    return lora_layers(model)


@contextmanager
def per_row(model: nn.Module, adapter_names: list[str | None]):
    """Inside the block, row i of every batch runs through adapter `adapter_names[i]` (None: the bare base) in every
    LoRA/DoRA layer, whatever is active: several adapters in one forward pass, each row computed as its adapter alone
    computes it (an adapter that does not target a layer leaves that layer's rows to the base). Inference only: no
    dropout; merged adapters are refused (a merged weight changes every row)."""
    layers = list(lora_layers(model).values())
    if any(layer.residual_of is not None for layer in layers):
        raise ModelError("this model's base weights hold the residual of a pissa/olora/loftq initialisation; save "
                         "the adapter (saving converts it to a plain LoRA) and serve it on the original model")
    merged = sorted({n for layer in layers for n in layer.merged})
    if merged:
        raise ModelError(f"adapters {merged} are merged into the base weights, so rows cannot choose their adapter; "
                         "unmerge first")
    groups: dict[str, list[int]] = {}
    for row, name in enumerate(adapter_names):
        if name is not None:
            groups.setdefault(name, []).append(row)
    rows = {name: torch.tensor(index) for name, index in groups.items()}
    for layer in layers:
        layer.rows = rows
    try:
        yield
    finally:
        for layer in layers:
            layer.rows = None


def adapter_tensors(model: nn.Module, adapter_name: str = DEFAULT) -> dict[str, torch.Tensor]:
    return {f"{PEFT_PREFIX}{name}.{suffix}": tensor
            for name, layer in lora_layers(model).items() if adapter_name in layer.lora_A
            for suffix, tensor in layer.adapter_tensors(adapter_name).items()}


def peft_config(settings: LoraSettings, base_model: str, targets: list[str], fan_in_fan_out: bool = False) -> dict:
    """PEFT's LoraConfig as a dict; `fan_in_fan_out`: the targets store their weights [in, out] (Conv1D)."""
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": settings.r,
        "lora_alpha": settings.alpha,
        "lora_dropout": settings.dropout,
        "target_modules": sorted(targets) if isinstance(targets, list) else targets,
        "use_rslora": settings.rslora,
        "use_dora": settings.name == "dora",
        "bias": "none",
        "fan_in_fan_out": fan_in_fan_out,
        "init_lora_weights": True,  # what PEFT writes for an adapter converted against the original weights
        "inference_mode": True,
        "modules_to_save": None,
        "layers_to_transform": None,
        "rank_pattern": {},
        "alpha_pattern": {},
    }


def save(model: nn.Module, settings: LoraSettings, folder, base_model: str, adapter_name: str = DEFAULT,
         fan_in_fan_out: bool = False) -> None:
    """`fan_in_fan_out`: the base the adapter is for stores its targets' weights [in, out] (Conv1D), also where the
    model in memory holds them otherwise (QLoRA's 4-bit layers)."""
    layers = lora_layers(model)
    targets = sorted({n.rsplit(".", 1)[-1] for n in layers})
    fan_in_fan_out = fan_in_fan_out or any(is_conv1d(layer.base_layer) for layer in layers.values())
    config, tensors = peft_config(settings, base_model, targets, fan_in_fan_out), adapter_tensors(model, adapter_name)
    initial = {f"{PEFT_PREFIX}{name}.": layer.initial() for name, layer in layers.items()
               if layer.residual_of == adapter_name}
    if initial:  # PEFT's path_initial_model_for_weight_conversion: a rank-2r LoRA on the original weights
        config, tensors = lora_init.converted_config(config), lora_init.converted(tensors, initial)
    write_adapter(folder, config, tensors)


def settings_from_peft(config: dict, folder, use_dora: bool = False) -> LoraSettings:
    if config.get("peft_type") != "LORA":
        raise ModelError(f"{folder}: adapter type is {config.get('peft_type')!r}, not LORA")
    if bool(config.get("use_dora")) != use_dora:
        saved, method = ("a DoRA", "dora") if config.get("use_dora") else ("a plain LoRA", "lora")
        raise ModelError(f"{folder}: holds {saved} adapter; load it with method {method!r}")
    unsupported = {
        "rank_pattern": bool(config.get("rank_pattern")),
        "alpha_pattern": bool(config.get("alpha_pattern")),
        "modules_to_save": bool(config.get("modules_to_save")),
        "layers_to_transform": config.get("layers_to_transform") is not None,
        "bias": config.get("bias", "none") != "none",
        f"init_lora_weights {config.get('init_lora_weights')!r} (an adapter for the residual base its "
        "initialisation left; save it from PEFT with path_initial_model_for_weight_conversion to get one for the "
        "original weights)": lora_init.mutates_base(config.get("init_lora_weights", True)),
    }
    bad = [k for k, v in unsupported.items() if v]
    if bad:
        raise ModelError(f"{folder}/adapter_config.json: LoRA options not supported yet: {', '.join(bad)}")
    cls = DoraSettings if use_dora else LoraSettings
    return cls(r=config["r"], alpha=config["lora_alpha"], dropout=config.get("lora_dropout", 0.0),
               target_modules=config["target_modules"], rslora=bool(config.get("use_rslora", False)))


def load(model: nn.Module, folder, adapter_name: str = DEFAULT) -> LoraSettings:
    """Load a LoRA adapter (ours or peft's) into `model`; shapes are checked against the base."""
    config, tensors = read_adapter(folder)
    settings = settings_from_peft(config, folder)
    apply(model, settings, adapter_name)
    copy_saved(model, folder, tensors, adapter_name)
    return settings


def copy_saved(model: nn.Module, folder, tensors: dict[str, torch.Tensor], adapter_name: str = DEFAULT) -> None:
    """Copy an adapter file's tensors into the (already applied) adapter, shapes checked."""
    theirs = {k.replace(f".{adapter_name}.", "."): v for k, v in tensors.items()}
    check_and_copy(folder, adapter_tensors(model, adapter_name), theirs)


def combine(model: nn.Module, weights: dict[str, float], new_name: str, how: str = "cat") -> LoraSettings:
    """A new adapter from a weighted combination of loaded ones.

    cat:    stack the ranks: A = [A_i], B = [w_i s_i B_i], scale 1. Exact: ΔW = Σ w_i s_i B_i A_i.
    linear: same rank required: A = Σ √(w_i s_i) A_i, B = Σ √(w_i s_i) B_i, scale 1. Exact for one adapter,
            an approximation otherwise (cross terms B_i A_j), as in PEFT's "linear" combination.
    """
    layers = {n: l for n, l in lora_layers(model).items() if all(a in l.lora_A for a in weights)}
    if not layers:
        raise ModelError(f"adapters {sorted(weights)} share no layer")
    if any(type(layer) is not LoraLinear for layer in layers.values()):
        raise ModelError(f"adapters {sorted(weights)}: only plain LoRA adapters can be combined; a DoRA adapter's "
                         "magnitude rescales its whole layer, so weighted sums of DoRA adapters are not DoRA adapters")
    rank = 0
    for layer in layers.values():
        As = [layer.lora_A[a].weight for a in weights]
        Bs = [layer.lora_B[a].weight for a in weights]
        if how == "cat":
            A = torch.cat(As, 0)
            B = torch.cat([w * layer.scaling[a] * b for (a, w), b in zip(weights.items(), Bs)], 1)
        elif how == "linear":
            if len({a.shape[0] for a in As}) != 1:
                raise ModelError("linear combination needs adapters of equal rank; use how='cat'")
            roots = [math.sqrt(w * layer.scaling[a]) for a, w in weights.items()]
            A = sum(r * a for r, a in zip(roots, As))
            B = sum(r * b for r, b in zip(roots, Bs))
        else:
            raise ModelError(f"unknown combination {how!r}; expected 'cat' or 'linear'")
        rank = A.shape[0]
        layer.add_adapter(new_name, rank, float(rank), 0.0, rslora=False)  # alpha = r: scale 1
        with torch.no_grad():
            layer.lora_A[new_name].weight.copy_(A)
            layer.lora_B[new_name].weight.copy_(B)
    targets = sorted({n.rsplit(".", 1)[-1] for n in layers})
    return LoraSettings(r=rank, alpha=float(rank), dropout=0.0, target_modules=targets)
