"""VeRA (Kopiczko et al., 2024): one pair of frozen random matrices A (r × widest input) and B (widest output × r)
shared by every targeted linear, and per target two trained vectors λ_d (r) and λ_b (out):
y = W·x + λ_b ⊙ (B_k · (λ_d ⊙ (A_d · dropout(x)))), where A_d is A's first d (the target's input) columns and B_k
B's first k (its output) rows. λ_b starts at 0 (the model starts as the base), λ_d at d_initial.

A and B are drawn as PEFT draws them: kaiming-uniform (bound √(6 / fan_in), fan_in = A's or B's second dimension),
A then B, from one torch.Generator on the CPU seeded with projection_prng_key, so an adapter saved without them
(save_projection false) gets the same ones back. Saved in PEFT's format: keys
`base_model.model.<module>.vera_lambda_b` / `.vera_lambda_d`, and `base_model.vera_A` / `base_model.vera_B`; config
with peft_type VERA.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from tunesmith.config import ALL_LINEAR
from tunesmith.config.methods import VeraSettings
from tunesmith.errors import ModelError
from tunesmith.methods.base import (AdapterLayer, adapter_functions, adapter_layers, adapter_targets, check_and_copy,
                                    is_conv1d, linear_features, read_adapter, set_weight_out_in, weight_out_in,
                                    wrapped, write_adapter)

PEFT_PREFIX = "base_model.model."
PROJECTION_KEYS = ("base_model.vera_A", "base_model.vera_B")
DEFAULT = "default"


def claims(config: dict) -> bool:
    return config.get("peft_type") == "VERA"


def kaiming_uniform(shape: tuple[int, int], generator: torch.Generator) -> torch.Tensor:
    """U(-√(6 / fan_in), √(6 / fan_in)) with fan_in = shape[1] (a gain of √2), drawn from `generator`."""
    bound = math.sqrt(3.0) * math.sqrt(2.0) / math.sqrt(shape[1])
    return torch.empty(shape).uniform_(-bound, bound, generator=generator)


def draw_projections(r: int, widest_in: int, widest_out: int, key: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) as PEFT draws them from `key`: A (r × widest_in) first, then B (widest_out × r), one CPU generator."""
    generator = torch.Generator(device="cpu").manual_seed(key)
    a = kaiming_uniform((r, widest_in), generator)
    return a, kaiming_uniform((widest_out, r), generator)


class SharedProjections(nn.Module):
    """Each adapter's frozen A and B, one object that every VeraLinear of the model holds (not parameters; not in
    a state dict: the adapter file stores them under PEFT's keys)."""

    def names(self) -> list[str]:
        return [n.removesuffix("_A") for n, _ in self.named_buffers(recurse=False) if n.endswith("_A")]

    def add(self, name: str, a: torch.Tensor, b: torch.Tensor) -> None:
        self.register_buffer(f"{name}_A", a, persistent=False)
        self.register_buffer(f"{name}_B", b, persistent=False)

    def pair(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        return self.get_buffer(f"{name}_A"), self.get_buffer(f"{name}_B")

    def remove(self, name: str) -> None:
        for part in ("A", "B"):
            self._buffers.pop(f"{name}_{part}", None)


class VeraLinear(AdapterLayer):
    METHOD = "vera"
    TAKES_CONV1D = True

    def __init__(self, base_layer: nn.Linear, projections: SharedProjections):
        super().__init__(base_layer)
        self.projections = projections
        self.vera_lambda_b = nn.ParameterDict()
        self.vera_lambda_d = nn.ParameterDict()
        self.vera_dropout = nn.ModuleDict()

    def names(self) -> list[str]:
        return list(self.vera_lambda_b)

    def add_adapter(self, name: str, r: int, d_initial: float, dropout: float) -> None:
        self.check_new_name(name, self.vera_lambda_b)
        a, b = self.projections.pair(name)
        d, k = linear_features(self.base_layer)
        if a.shape[0] != r or a.shape[1] < d or b.shape[0] < k:
            raise ModelError(f"vera: adapter {name!r}'s shared A {tuple(a.shape)} and B {tuple(b.shape)} cannot serve "
                             f"a target of {d} inputs and {k} outputs at rank {r}")
        device = self.base_layer.weight.device
        self.vera_lambda_b[name] = nn.Parameter(torch.zeros(k, device=device, dtype=torch.float32))
        self.vera_lambda_d[name] = nn.Parameter(torch.full((r,), float(d_initial), device=device, dtype=torch.float32))
        self.vera_dropout[name] = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.active = name

    def remove_adapter(self, name: str) -> None:
        self.unmerge(name)
        del self.vera_lambda_b[name], self.vera_lambda_d[name], self.vera_dropout[name]
        self.projections.remove(name)
        if self.active == name:
            self.active = None

    def corners(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """This target's corner of the shared pair: A's first d columns, B's first k rows."""
        a, b = self.projections.pair(name)
        d, k = linear_features(self.base_layer)
        return a[:, :d], b[:k]

    def delta_weight(self, name: str) -> torch.Tensor:
        """ΔW = diag(λ_b)·B_k·diag(λ_d)·A_d, as [out, in] in fp32."""
        a, b = self.corners(name)
        lambda_b, lambda_d = self.vera_lambda_b[name], self.vera_lambda_d[name]
        return (lambda_b.float()[:, None] * b.float()) @ (lambda_d.float()[:, None] * a.float())

    def fold(self, name: str, inverse: bool) -> None:
        w = weight_out_in(self.base_layer)
        delta = self.delta_weight(name).to(w.dtype)
        set_weight_out_in(self.base_layer, w - delta if inverse else w + delta)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        name = self.active
        if name is None or name in self.merged:
            return self.base_layer(x)
        out = self.base_layer(x)
        a, b = self.corners(name)
        lambda_b, lambda_d = self.vera_lambda_b[name], self.vera_lambda_d[name]
        h = self.vera_dropout[name](x)
        if not torch.is_autocast_enabled(h.device.type):
            h = h.to(lambda_d.dtype)
        update = lambda_b * F.linear(lambda_d * F.linear(h, a), b)
        return out + update.to(out.dtype)


def vera_layers(model: nn.Module) -> dict[str, VeraLinear]:
    return adapter_layers(model, VeraLinear)


# unload puts the plain base linears back, and the shared A and B go with the layers that held them
set_active, disabled, merge, unmerge, unload, delete_adapter = adapter_functions(VeraLinear, "VeRA scales")
virtual_tokens = None  # no virtual tokens


def shared_projections(model: nn.Module) -> SharedProjections:
    """The model's SharedProjections: the one its VeRA layers hold, or a new one."""
    for layer in vera_layers(model).values():
        return layer.projections
    return SharedProjections()


def widest(model: nn.Module, names: list[str]) -> tuple[int, int]:
    """(widest input, widest output) over the linears `names` (wrapped or not)."""
    features = [linear_features(_base(model.get_submodule(n))) for n in names]
    return max(d for d, _ in features), max(k for _, k in features)


def _base(layer: nn.Module) -> nn.Module:
    return layer.base_layer if isinstance(layer, AdapterLayer) else layer


def apply(model: nn.Module, settings: VeraSettings, adapter_name: str = DEFAULT,
          projections: tuple[torch.Tensor, torch.Tensor] | None = None) -> dict[str, VeraLinear]:
    """Freeze the model, draw the adapter's shared A and B (or take `projections`, e.g. read from an adapter file)
    and add λ_b, λ_d to every targeted linear layer."""
    names = adapter_targets(model, settings.target_modules, adapter_name, VeraLinear)
    widest_in, widest_out = widest(model, names)
    if projections is None:
        projections = draw_projections(settings.r, widest_in, widest_out, settings.projection_prng_key)
    device = _base(model.get_submodule(names[0])).weight.device
    shared = shared_projections(model)
    shared.add(adapter_name, *(t.to(device=device, dtype=torch.float32) for t in projections))
    for name in names:
        layer = wrapped(model, name, VeraLinear, shared)
        layer.add_adapter(adapter_name, settings.r, settings.d_initial, settings.dropout)
    return vera_layers(model)


def adapter_tensors(model: nn.Module, adapter_name: str = DEFAULT) -> dict[str, torch.Tensor]:
    return {f"{PEFT_PREFIX}{name}.{kind}": getattr(layer, kind)[adapter_name]
            for name, layer in vera_layers(model).items() if adapter_name in layer.vera_lambda_b
            for kind in ("vera_lambda_b", "vera_lambda_d")}


def peft_config(settings: VeraSettings, base_model: str, targets: list[str] | str, fan_in_fan_out: bool) -> dict:
    """PEFT's VeraConfig as a dict."""
    return {
        "peft_type": "VERA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": settings.r,
        "target_modules": targets,
        "projection_prng_key": settings.projection_prng_key,
        "save_projection": settings.save_projection,
        "vera_dropout": settings.dropout,
        "d_initial": settings.d_initial,
        "fan_in_fan_out": fan_in_fan_out,
        "bias": "none",
        "init_weights": True,
        "inference_mode": True,
        "modules_to_save": None,
        "layers_to_transform": None,
        "layers_pattern": None,
    }


def saved_targets(settings: VeraSettings, layers: dict[str, VeraLinear]) -> list[str] | str:
    """What adapter_config.json's target_modules says: the regex as given (it selects exactly these layers in PEFT
    too), else the targets' name suffixes."""
    if isinstance(settings.target_modules, str) and settings.target_modules != ALL_LINEAR:
        return settings.target_modules
    return sorted({n.rsplit(".", 1)[-1] for n in layers})


def save(model: nn.Module, settings: VeraSettings, folder, base_model: str, adapter_name: str = DEFAULT) -> None:
    layers = {n: layer for n, layer in vera_layers(model).items() if adapter_name in layer.vera_lambda_b}
    tensors = adapter_tensors(model, adapter_name)
    if settings.save_projection:
        tensors.update(zip(PROJECTION_KEYS, shared_projections(model).pair(adapter_name)))
    fan_in_fan_out = any(is_conv1d(layer.base_layer) for layer in layers.values())
    write_adapter(folder, peft_config(settings, base_model, saved_targets(settings, layers), fan_in_fan_out), tensors)


def settings_from_peft(config: dict, folder) -> VeraSettings:
    if not claims(config):
        raise ModelError(f"{folder}: adapter type is {config.get('peft_type')!r}, not VERA")
    unsupported = {
        "modules_to_save": bool(config.get("modules_to_save")),
        "layers_to_transform": config.get("layers_to_transform") is not None,
        "bias": config.get("bias", "none") != "none",
    }
    bad = [k for k, v in unsupported.items() if v]
    if bad:
        raise ModelError(f"{folder}/adapter_config.json: VeRA options not supported yet: {', '.join(bad)}")
    targets = config["target_modules"]
    return VeraSettings(r=config["r"], target_modules=sorted(targets) if isinstance(targets, list) else targets,
                        projection_prng_key=config.get("projection_prng_key", 0),
                        save_projection=config.get("save_projection", True), dropout=config.get("vera_dropout", 0.0),
                        d_initial=config.get("d_initial", 0.1))


def load(model: nn.Module, folder, adapter_name: str = DEFAULT) -> VeraSettings:
    """Load a VeRA adapter (ours or PEFT's) into `model`: A and B from the file, or drawn again from the key where
    it holds none (save_projection false); shapes are checked against the base."""
    config, tensors = read_adapter(folder)
    settings = settings_from_peft(config, folder)
    projections = None
    if all(k in tensors for k in PROJECTION_KEYS):
        projections = tuple(tensors.pop(k) for k in PROJECTION_KEYS)
    elif settings.save_projection:
        raise ModelError(f"{folder}: adapter_config.json says save_projection, but the adapter holds no "
                         f"{' / '.join(PROJECTION_KEYS)}")
    names = adapter_targets(model, settings.target_modules, adapter_name, VeraLinear)
    if projections is not None:
        widest_in, widest_out = widest(model, names)
        a, b = projections
        if a.shape[0] != settings.r or a.shape[1] < widest_in or b.shape[0] < widest_out or b.shape[1] != settings.r:
            raise ModelError(f"{folder}: this adapter does not fit the base model (made for a different base?): its "
                             f"vera_A is {tuple(a.shape)} and vera_B {tuple(b.shape)}, the targets need at least "
                             f"({settings.r}, {widest_in}) and ({widest_out}, {settings.r})")
    apply(model, settings, adapter_name, projections)
    theirs = {k.replace(f".{adapter_name}.", "."): v for k, v in tensors.items()}
    check_and_copy(folder, adapter_tensors(model, adapter_name), theirs)
    return settings
