"""The base model and its named LoRA/DoRA adapters while the server runs: hot-load and unload without disturbing
requests in flight (an unloaded adapter leaves once its last request ends), adapter paths confined to --adapter-dir."""

from __future__ import annotations

import threading
from pathlib import Path

from tunesmith.serve.errors import ApiError

ALLOWED_METHODS = ("lora", "dora")


class Registry:
    def __init__(self, model, tokenizer, base_name: str = "base", adapter_dir: str | None = None):
        self.model, self.tokenizer, self.base_name = model, tokenizer, base_name
        self.adapter_dir = Path(adapter_dir).resolve() if adapter_dir else None
        self.model_lock = threading.RLock()  # held for every forward step and every change of the adapter set
        self._state = threading.Lock()
        self.adapters: dict[str, str] = {}
        self.in_use: dict[str, int] = {}
        self.leaving: set[str] = set()

    def names(self) -> list[str]:
        with self._state:
            return [self.base_name] + [n for n in self.adapters if n not in self.leaving]

    def resolve_path(self, path: str) -> Path:
        """`path` (relative to --adapter-dir, or absolute) with symlinks resolved; 403 unless it lies inside."""
        if self.adapter_dir is None:
            raise ApiError(403, "hot-loading adapters is off: start the server with --adapter-dir DIR",
                           "permission_error", "path")
        candidate = Path(path)
        resolved = (candidate if candidate.is_absolute() else self.adapter_dir / candidate).resolve()
        if not resolved.is_relative_to(self.adapter_dir):
            raise ApiError(403, f"adapter path {path!r} is outside --adapter-dir", "permission_error", "path")
        return resolved

    def load(self, name: str, path: str | Path, check_dir: bool = True) -> None:
        from tunesmith.errors import TunesmithError
        from tunesmith.methods import lora, method_for_adapter, trainable_tokens
        from tunesmith.methods.base import read_adapter_config

        folder = self.resolve_path(str(path)) if check_dir else Path(path)
        if not name.isidentifier() or name == self.base_name:
            raise ApiError(400, f"adapter name {name!r}: use a plain identifier other than {self.base_name!r}",
                           param="name")
        with self._state:
            if name in self.adapters:
                raise ApiError(409, f"an adapter named {name!r} is already loaded", "conflict", "name")
        try:
            method_name, module = method_for_adapter(folder)
            if read_adapter_config(folder).get(trainable_tokens.CONFIG_KEY) is not None:
                raise ApiError(400, f"{path}: the adapter carries trained token rows and its own tokenizer, which the "
                               "server's adapters would share; merge it (tunesmith merge) and serve the merged "
                               "model with --model", param="path")
            if method_name not in ALLOWED_METHODS:
                raise ApiError(400, f"{path}: a {method_name} adapter cannot be served beside others; the server "
                               f"loads {' and '.join(ALLOWED_METHODS)} adapters", param="path")
            with self.model_lock:
                actives = {n: m.active for n, m in lora.lora_layers(self.model).items()}
                module.load(self.model, folder, name)
                for layer_name, layer in lora.lora_layers(self.model).items():  # loading activates the new adapter
                    layer.active = actives.get(layer_name)
        except TunesmithError as e:
            raise ApiError(400, str(e), param="path") from None
        with self._state:
            self.adapters[name] = str(folder)

    def unload(self, name: str) -> None:
        with self._state:
            if name not in self.adapters or name in self.leaving:
                raise ApiError(404, f"no adapter named {name!r}; loaded: {', '.join(self._loaded())}", "not_found",
                               "name", "model_not_found")
            self.leaving.add(name)
            idle = not self.in_use.get(name)
        if idle:
            self._delete(name)

    def _loaded(self) -> list[str]:
        return [n for n in self.adapters if n not in self.leaving] or ["(none)"]

    def acquire(self, model_name: str) -> str | None:
        """The adapter a request for `model_name` runs with (None: the base); 404 listing the models otherwise."""
        if model_name == self.base_name:
            return None
        with self._state:
            if model_name in self.adapters and model_name not in self.leaving:
                self.in_use[model_name] = self.in_use.get(model_name, 0) + 1
                return model_name
            available = [self.base_name] + [n for n in self.adapters if n not in self.leaving]
        raise ApiError(404, f"model {model_name!r} does not exist; available: {', '.join(available)}",
                       "invalid_request_error", "model", "model_not_found")

    def release(self, adapter: str | None) -> None:
        if adapter is None:
            return
        with self._state:
            self.in_use[adapter] -= 1
            done = adapter in self.leaving and not self.in_use[adapter]
        if done:
            self._delete(adapter)

    def _delete(self, name: str) -> None:
        from tunesmith.methods import lora

        with self.model_lock:
            lora.delete_adapter(self.model, name)
        with self._state:
            self.adapters.pop(name, None)
            self.leaving.discard(name)
            self.in_use.pop(name, None)
