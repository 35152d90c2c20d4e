"""Methods decide what trains. Each module has the same small interface:

    MERGEABLE: bool
    apply(model, settings) -> None                 freeze the base, add the method's trainable parameters
    save(model, settings, folder, base_model)      adapter_config.json + adapter_model.safetensors (PEFT's format
                                                   where PEFT has the method)
    load(model, folder) -> settings                the inverse, shapes checked against the base
    claims(adapter_config: dict) -> bool           whether a saved adapter folder is this method's
    merge(model), unload(model) -> model           only where MERGEABLE
    disabled(model)                                a context manager running the bare base model inside it (adapters
                                                   off, no copy); only where the base weights stay untouched, so
                                                   not for full, freeze and bitfit
"""

from __future__ import annotations

import importlib

from tunesmith.config.methods import METHOD_NAMES
from tunesmith.errors import ConfigError, ModelError

MODULES = {"full": "full", "freeze": "freeze", "bitfit": "bitfit", "lora": "lora", "dora": "dora", "qlora": "qlora",
           "ia3": "ia3", "adapter": "adapter", "prompt": "prompt", "prefix": "prefix", "ptuning-v2": "prefix"}


def get_method(name: str):
    if name not in MODULES:
        raise ConfigError(f"method.name: unknown method {name!r}; expected one of: {', '.join(METHOD_NAMES)}")
    return importlib.import_module(f"tunesmith.methods.{MODULES[name]}")


def method_for_adapter(folder) -> tuple[str, object]:
    """Which method saved this adapter folder (by its adapter_config.json)."""
    from tunesmith.methods.base import read_adapter_config

    config = read_adapter_config(folder)
    for name in dict.fromkeys(MODULES.values()):
        try:
            module = importlib.import_module(f"tunesmith.methods.{name}")
        except ModuleNotFoundError:
            continue
        if module.claims(config):
            return name, module
    raise ModelError(f"{folder}: adapter type {config.get('peft_type')!r} is not one tunesmith can load")
