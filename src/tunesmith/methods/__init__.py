"""Methods decide what trains. The registry below is the one table of method names: each is a module satisfying
methods/protocol.py's `Method`, whose declaration (artifact, merging, memory terms) sits on its settings class in
config/methods.py. A new method is its module, its settings class, one line here, its test and its docs."""

from __future__ import annotations

import importlib

from tunesmith.config.methods import METHOD_NAMES, settings_class
from tunesmith.errors import ConfigError, ModelError
from tunesmith.methods.protocol import Method, MethodDeclaration

# method name -> its module in tunesmith.methods
METHODS = {
    "full": "full",
    "freeze": "freeze",
    "bitfit": "bitfit",
    "lora": "lora",
    "dora": "dora",
    "qlora": "qlora",
    "ia3": "ia3",
    "loha": "loha",
    "lokr": "lokr",
    "vera": "vera",
    "adapter": "adapter",
    "prompt": "prompt",
    "prefix": "prefix",
    "ptuning-v2": "prefix",
}


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise ConfigError(f"method.name: unknown method {name!r}; expected one of: {', '.join(METHOD_NAMES)}")
    return importlib.import_module(f"tunesmith.methods.{METHODS[name]}")


def declaration(name: str) -> MethodDeclaration:
    """What method `name` declares about itself (on its settings class, config/methods.py)."""
    return settings_class(name).declaration


def method_for_adapter(folder) -> tuple[str, Method]:
    """Which method saved this adapter folder (by its adapter_config.json): its name and module."""
    from tunesmith.methods.base import read_adapter_config

    config = read_adapter_config(folder)
    first_name: dict[str, str] = {}  # ptuning-v2's module is prefix's: an adapter of either is "prefix"
    for name, module_name in METHODS.items():
        first_name.setdefault(module_name, name)
    for module_name, name in first_name.items():
        try:
            module = importlib.import_module(f"tunesmith.methods.{module_name}")
        except ModuleNotFoundError:
            continue
        if module.claims(config):
            return name, module
    raise ModelError(f"{folder}: adapter type {config.get('peft_type')!r} is not one tunesmith can load")
