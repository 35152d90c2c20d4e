"""What every method shares: target matching, parameter counting, the adapter files on disk, and the layers that
hold named adapters (LoRA's, DoRA's, (IA)³'s) with the model-level operations on them."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path
from typing import NamedTuple

import torch
from torch import nn

from tunesmith.atomic import atomic_folder
from tunesmith.config import ALL_LINEAR, DEFAULT_MODEL
from tunesmith.config.methods import BASE_MODEL_KEY
from tunesmith.errors import ConfigError, ModelError
from tunesmith.kernels.patches import conv1d_class
from tunesmith.surgery import replace_module

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
TOKEN_ROWS_KEY = "token_adapter.trainable_tokens_delta"  # PEFT's key of token rows (methods/trainable_tokens.py)


# BASE_MODEL_KEY: the base as the run's model.path named it, kept in adapter_model.safetensors' metadata
# (adapter_config.json's base_model_name_or_path holds what other tools resolve, and PEFT warns about keys it does
# not know there).


def saved_base(folder: str | Path) -> str | None:
    """The base model as tunesmith named it when it wrote the adapter in `folder`; None for other adapters."""
    from safetensors import safe_open

    weights = Path(folder) / ADAPTER_WEIGHTS
    if not weights.is_file():
        return None
    with safe_open(str(weights), "pt") as fh:
        return (fh.metadata() or {}).get(BASE_MODEL_KEY)


def adapter_base(adapters: dict[str, str], model: str | None) -> str:
    """The base model to load: `model` if given, else the first adapter's base as tunesmith named it (`saved_base`),
    else its base_model_name_or_path (adapters from PEFT and elsewhere), else the embedded default."""
    if model:
        return model
    for path in adapters.values():
        return saved_base(path) or read_adapter_config(path).get("base_model_name_or_path") or DEFAULT_MODEL
    return DEFAULT_MODEL


def portable_base(name: str) -> str:
    """What other tools (PEFT's AutoPeftModel, transformers) resolve for the base `name`: the local folder of a
    builtin model or of a path, the hub id itself otherwise."""
    from tunesmith.models import builtin_folder

    if name.startswith("builtin:"):
        return str(builtin_folder(name.removeprefix("builtin:")))
    path = Path(name).expanduser()
    return str(path.resolve()) if path.exists() else name


def is_conv1d(layer: nn.Module) -> bool:
    """transformers' Conv1D or a stand-in for it (kernels/: the same [in, out] weight), unlike kernels.patches'
    exact-type test."""
    return isinstance(layer, conv1d_class())


def linear_features(layer: nn.Module) -> tuple[int, int]:
    """(in, out) of an nn.Linear or a Conv1D."""
    if is_conv1d(layer):
        return tuple(layer.weight.shape)
    return layer.in_features, layer.out_features


def weight_out_in(layer: nn.Module) -> torch.Tensor:
    """The layer's weight as [out, in] (nn.Linear's layout; a transposed view of a Conv1D's)."""
    return layer.weight.t() if is_conv1d(layer) else layer.weight


def set_weight_out_in(layer: nn.Module, weight: torch.Tensor) -> None:
    """Store an [out, in] weight in the layer's own layout and dtype."""
    w = layer.weight
    w.data = (weight.t().contiguous() if is_conv1d(layer) else weight).to(w.dtype)


def _output_head(model: nn.Module) -> nn.Module | None:
    get = getattr(model, "get_output_embeddings", None)
    return get() if callable(get) else None


def all_linear_names(model: nn.Module, kinds: tuple[type, ...]) -> list[str]:
    """PEFT's `all-linear`: every linear layer (nn.Linear, Conv1D, or a wrapper already holding adapters, which
    match_modules then takes or refuses as `kinds` say) except the output head, and nothing inside a wrapper."""
    linear = (nn.Linear, conv1d_class(), AdapterLayer, *kinds)
    head = _output_head(model)
    names, inside = [], []
    for name, module in model.named_modules():
        if any(name.startswith(w + ".") for w in inside) or module is head or not isinstance(module, linear):
            continue
        names.append(name)
        if isinstance(module, AdapterLayer):
            inside.append(name)
    return names


def _takes(module: nn.Module, kinds: tuple[type, ...], name: str, method: str) -> None:
    if isinstance(module, kinds):
        return
    if is_conv1d(module):
        raise ConfigError(f"method.name: {method} cannot take '{name}', a Conv1D (GPT-2's linear layer, its weight "
                          "stored transposed as [in, out]); use lora, dora, qlora, bitfit or full on this model")
    raise ConfigError(f"method.target_modules: '{name}' is a {type(module).__name__}; only "
                      f"{'/'.join(k.__name__ for k in kinds)} layers can be targeted")


def match_modules(model: nn.Module, targets: list[str] | str, kinds=(nn.Linear,), method: str = "this method"
                  ) -> list[str]:
    """PEFT's rule: a list matches names equal to or ending in '.<entry>'; a string is a full-name regex, except
    `all-linear` (ALL_LINEAR): every linear layer but the output head. Matched layers that are not `kinds` are
    refused (a Conv1D with the method's name)."""
    if targets == ALL_LINEAR:
        names = all_linear_names(model, kinds)
    else:
        names = [name for name, _ in model.named_modules()
                 if (re.fullmatch(targets, name) is not None if isinstance(targets, str)
                     else any(name == t or name.endswith("." + t) for t in targets))]
    for name in names:
        _takes(model.get_submodule(name), kinds, name, method)
    if not names:
        linear = (nn.Linear, conv1d_class())
        suffixes = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, linear)})
        raise ConfigError(
            f"method.target_modules: {targets!r} matches no layer of this model; its linear layers are named: "
            + ", ".join(suffixes)
        )
    return names


def freeze_all(model: nn.Module) -> None:
    for p in model.parameters():
        p.requires_grad_(False)


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total), counting tied tensors once."""
    seen: set[int] = set()
    trainable = total = 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        if p.requires_grad:
            trainable += p.numel()
    return trainable, total


def parameter_groups(model: nn.Module, settings, lr: float, weight_decay: float) -> list[dict]:
    """The trained parameters as the optimizer's groups, each with its own lr and weight_decay: LoRA+'s groups
    (methods/loraplus.py) where the method's settings give an `lr_ratio`, else one group."""
    ratio = getattr(settings, "lr_ratio", None)  # an option of the LoRA family's settings (config/methods.py)
    if ratio is not None:
        from tunesmith.methods.loraplus import loraplus_groups

        return loraplus_groups(model, lr, weight_decay, ratio)
    return [{"params": [p for p in model.parameters() if p.requires_grad], "lr": lr, "weight_decay": weight_decay}]


def write_adapter(folder: str | Path, config: dict, tensors: dict[str, torch.Tensor]) -> None:
    """Write adapter_config.json + adapter_model.safetensors atomically (temp folder, fsync, rename). The config's
    base_model_name_or_path becomes what other tools resolve (`portable_base`); tunesmith's name goes in the weights'
    metadata (BASE_MODEL_KEY)."""
    with atomic_folder(folder) as tmp:
        write_adapter_files(tmp, config, tensors)


def write_adapter_files(folder: Path, config: dict, tensors: dict[str, torch.Tensor]) -> None:
    """The two files of `write_adapter`, written in place (into a folder that is renamed into place afterwards)."""
    from safetensors.torch import save_file

    metadata = {"format": "pt"}
    base = config.get("base_model_name_or_path")
    if base:
        metadata[BASE_MODEL_KEY] = base
        config = {**config, "base_model_name_or_path": portable_base(base)}
    (folder / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(folder / ADAPTER_WEIGHTS),
              metadata=metadata)


def read_adapter_config(folder: str | Path) -> dict:
    folder = Path(folder)
    cfg_path = folder / ADAPTER_CONFIG
    if not cfg_path.is_file():
        raise ModelError(f"{folder}: not an adapter folder (no {ADAPTER_CONFIG})")
    try:
        return json.loads(cfg_path.read_text())
    except json.JSONDecodeError as e:
        raise ModelError(f"{cfg_path}:{e.lineno}: malformed JSON ({e.msg})") from None


def read_adapter(folder: str | Path) -> tuple[dict, dict[str, torch.Tensor]]:
    from safetensors.torch import load_file

    folder = Path(folder)
    config = read_adapter_config(folder)
    w_path = folder / ADAPTER_WEIGHTS
    if not w_path.is_file():
        if (folder / "adapter_model.bin").is_file():
            raise ModelError(f"{folder}: holds adapter_model.bin (pickle); tunesmith loads safetensors only. "
                             "Re-save it with peft's save_pretrained(safe_serialization=True).")
        raise ModelError(f"{folder}: no {ADAPTER_WEIGHTS}")
    return config, load_file(str(w_path))


def check_and_copy(folder, ours: dict[str, torch.Tensor], theirs: dict[str, torch.Tensor]) -> None:
    """Copy saved tensors into the model's, refusing with the differing names/shapes if they do not fit. Trained token
    rows (TOKEN_ROWS_KEY) ride along in any method's adapter and are methods/trainable_tokens.py's to load."""
    theirs = {k: v for k, v in theirs.items() if TOKEN_ROWS_KEY not in k or k in ours}
    missing = sorted(set(ours) - set(theirs))
    unexpected = sorted(set(theirs) - set(ours))
    wrong = [(k, tuple(theirs[k].shape), tuple(ours[k].shape))
             for k in ours if k in theirs and theirs[k].shape != ours[k].shape]
    if missing or unexpected or wrong:
        lines = [f"{folder}: this adapter does not fit the base model (made for a different base?)"]
        lines += [f"  - {k}: adapter has {a}, model expects {b}" for k, a, b in wrong[:5]]
        lines += [f"  - missing in adapter: {k}" for k in missing[:3]]
        lines += [f"  - not in model: {k}" for k in unexpected[:3]]
        raise ModelError("\n".join(lines))
    with torch.no_grad():
        for k, p in ours.items():
            p.copy_(theirs[k].to(p.dtype))


class AdapterLayer(nn.Module):
    """A linear wrapped to hold named adapters: one active at a time (or none), each mergeable into the base weights
    and back. A subclass stores its adapters, says which it holds (`names`) and how one folds into the base weights
    (`fold`); `METHOD` is the module whose functions manage it, for messages."""

    METHOD = ""
    TAKES_CONV1D = False  # whether it can wrap a Conv1D (weight_out_in gives its weight as [out, in])

    def __init__(self, base_layer: nn.Linear):
        super().__init__()
        self.base_layer = base_layer
        self.active: str | None = None
        self.merged: set[str] = set()

    @property
    def weight(self) -> torch.Tensor:  # lets code that inspects `.weight` (e.g. dtype probes) keep working
        return self.base_layer.weight

    def names(self) -> list[str]:
        raise NotImplementedError

    def fold(self, name: str, inverse: bool) -> None:
        """Put adapter `name`'s effect into the base weights, or (inverse) take it out."""
        raise NotImplementedError

    def released(self) -> nn.Module:
        """The base layer to put back in the wrapper's place when the adapters are unloaded."""
        return self.base_layer

    def remove_adapter(self, name: str) -> None:
        """Forget adapter `name` (unmerged first); the layer runs its base alone if it was the active one."""
        raise NotImplementedError

    def check_new_name(self, name: str, store: nn.Module) -> None:
        """Refuse a name this layer holds, or one `store` (the dict its tensors go in) cannot take as a key."""
        if name in self.names():
            raise ModelError(name_taken(name, self.names(), self.METHOD))
        if not name.isidentifier() or hasattr(store, name):
            raise ModelError(f"adapter name {name!r} is not allowed (use a plain identifier that is not a "
                             "torch.nn.Module attribute such as 'half' or 'train')")

    @torch.no_grad()
    def merge(self, name: str | None = None) -> None:
        name = name or self.active
        if name is None or name in self.merged:
            return
        self.fold(name, inverse=False)
        self.merged.add(name)

    @torch.no_grad()
    def unmerge(self, name: str | None = None) -> None:
        name = name or self.active
        if name not in self.merged:
            return
        self.fold(name, inverse=True)
        self.merged.discard(name)


def name_taken(name: str, present: list[str], method: str) -> str:
    return (f"adapter name {name!r} is already taken on this model (its adapters: {', '.join(sorted(present))}); "
            "give the new adapter another name: adapter_name=... in Python, --adapter NAME=PATH on the command line "
            f"(or delete the old one first: {method}.delete_adapter(model, NAME))")


def adapter_layers(model: nn.Module, layer_cls: type[AdapterLayer]) -> dict[str, AdapterLayer]:
    return {n: m for n, m in model.named_modules() if isinstance(m, layer_cls)}


def loaded_names(model: nn.Module, layer_cls: type[AdapterLayer]) -> list[str]:
    return sorted({n for layer in adapter_layers(model, layer_cls).values() for n in layer.names()})


def adapter_targets(model: nn.Module, target_modules: list[str] | str, adapter_name: str,
                    layer_cls: type[AdapterLayer]) -> list[str]:
    """Freeze the model and name the linears (or `layer_cls` wrappers) an adapter `adapter_name` goes on; a name
    already loaded is refused before anything changes."""
    present = loaded_names(model, layer_cls)
    if adapter_name in present:
        raise ModelError(name_taken(adapter_name, present, layer_cls.METHOD))
    freeze_all(model)
    kinds = (nn.Linear, conv1d_class(), layer_cls) if layer_cls.TAKES_CONV1D else (nn.Linear, layer_cls)
    return match_modules(model, target_modules, kinds, layer_cls.METHOD)


def wrapped(model: nn.Module, name: str, layer_cls: type[AdapterLayer], *args) -> AdapterLayer:
    """The layer `name` as a `layer_cls` wrapper: the one already there, or `layer_cls(linear, *args)` put in its
    place; a wrapper of another class is refused (one layer holds adapters of one kind)."""
    layer = model.get_submodule(name)
    if not isinstance(layer, AdapterLayer):
        layer = layer_cls(layer, *args)
        replace_module(model, name, layer)
    elif type(layer) is not layer_cls:
        raise ConfigError(f"{name} already holds {type(layer).__name__} adapters; cannot add a "
                          f"{layer_cls.__name__} one beside them")
    return layer


class AdapterFunctions(NamedTuple):
    set_active: Callable
    disabled: Callable
    merge: Callable
    unmerge: Callable
    unload: Callable
    delete_adapter: Callable


def adapter_functions(layer_cls: type[AdapterLayer], what: str) -> AdapterFunctions:
    """The method-interface functions over a model's `layer_cls` layers, one set whatever the adapter kind, so a
    method module exports them (`set_active, disabled, ... = adapter_functions(LoraLinear, "adapters")`); `what` is
    what its adapters are called in messages."""

    def set_active(model: nn.Module, adapter_name: str | None) -> None:
        """Activate one adapter by name, or None to run the bare base model. Layers the adapter does not target run
        their base alone (adapters loaded side by side may target different modules); an unknown name is refused
        with the loaded ones."""
        layers = adapter_layers(model, layer_cls).values()
        if adapter_name is not None and not any(adapter_name in layer.names() for layer in layers):
            loaded = loaded_names(model, layer_cls)
            raise ModelError(f"no adapter named {adapter_name!r} to activate; loaded: {', '.join(loaded) or 'none'}")
        for layer in layers:
            layer.active = adapter_name if adapter_name in layer.names() else None

    @contextmanager
    def disabled(model: nn.Module):
        """Run the bare base model inside the block (every adapter off, none merged), then restore each layer's
        active state. Adapters merged into the base weights cannot be switched off."""
        layers = list(adapter_layers(model, layer_cls).values())
        if any(layer.merged for layer in layers):
            raise ModelError(f"{what} are merged into the base weights, so they cannot be switched off; unmerge first")
        saved = [layer.active for layer in layers]
        try:
            for layer in layers:
                layer.active = None
            yield model
        finally:
            for layer, active in zip(layers, saved):
                layer.active = active

    def merge(model: nn.Module) -> None:
        for layer in adapter_layers(model, layer_cls).values():
            layer.merge()

    def unmerge(model: nn.Module) -> None:
        for layer in adapter_layers(model, layer_cls).values():
            layer.unmerge()

    def unload(model: nn.Module) -> nn.Module:
        """Put the plain base linears back (merge first to keep the adapters' effect)."""
        for name, layer in list(adapter_layers(model, layer_cls).items()):
            replace_module(model, name, layer.released())
        return model

    def delete_adapter(model: nn.Module, adapter_name: str) -> None:
        """Remove adapter `adapter_name` from every layer holding it (unmerged first)."""
        layers = adapter_layers(model, layer_cls).values()
        if not any(adapter_name in layer.names() for layer in layers):
            raise ModelError(f"no adapter named {adapter_name!r} is loaded")
        for layer in layers:
            if adapter_name in layer.names():
                layer.remove_adapter(adapter_name)

    return AdapterFunctions(set_active, disabled, merge, unmerge, unload, delete_adapter)


def quantized_layers(model: nn.Module) -> list[str]:
    """Names of linears whose weights are stored in 4 bits (an int4 folder, or NF4): frozen, not parameters."""
    from tunesmith.quant.linear import Int4Linear
    from tunesmith.quant.nf4 import is_4bit

    return [n for n, m in model.named_modules() if isinstance(m, Int4Linear) or is_4bit(m)]


def refuse_training_quantized(method: str, layers: list[str]) -> None:
    if layers:
        raise ConfigError(f"method.name: {method} would train base weights, but {layers[0]} (and {len(layers) - 1} "
                          "more) are stored in 4 bits and cannot train; use lora, dora or ia3 on a quantised model, "
                          f"or {method} on the full-precision one")
