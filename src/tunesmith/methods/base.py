"""What every method shares: target matching, parameter counting, the adapter files on disk."""

from __future__ import annotations

import json
import re
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from tunesmith.atomic import atomic_folder
from tunesmith.config import DEFAULT_MODEL
from tunesmith.errors import ConfigError, ModelError
from tunesmith.surgery import replace_module  # noqa: F401  (the methods' import path)

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


def adapter_base(adapters: dict[str, str], model: str | None) -> str:
    """The base model to load: `model` if given, else the first adapter's base_model_name_or_path, else the
    embedded default."""
    if model:
        return model
    for path in adapters.values():
        return read_adapter_config(path).get("base_model_name_or_path") or DEFAULT_MODEL
    return DEFAULT_MODEL


def match_modules(model: nn.Module, targets: list[str] | str, kinds=(nn.Linear,)) -> list[str]:
    """PEFT's rule: a list matches names equal to or ending in '.<entry>'; a string is a full-name regex."""
    names = []
    for name, module in model.named_modules():
        if isinstance(targets, str):
            hit = re.fullmatch(targets, name) is not None
        else:
            hit = any(name == t or name.endswith("." + t) for t in targets)
        if hit:
            if not isinstance(module, kinds):
                raise ConfigError(
                    f"method.target_modules: '{name}' is a {type(module).__name__}; only "
                    f"{'/'.join(k.__name__ for k in kinds)} layers can be targeted"
                )
            names.append(name)
    if not names:
        suffixes = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, kinds)})
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


def write_adapter(folder: str | Path, config: dict, tensors: dict[str, torch.Tensor]) -> None:
    """Write adapter_config.json + adapter_model.safetensors atomically (temp folder, fsync, rename)."""
    from safetensors.torch import save_file

    with atomic_folder(folder) as tmp:
        (tmp / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp / ADAPTER_WEIGHTS),
                  metadata={"format": "pt"})


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
    """Copy saved tensors into the model's, refusing with the differing names/shapes if they do not fit."""
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


@contextmanager
def switched_off(model: nn.Module, layers: list, merged_error: str):
    """Inside the block every layer runs without its trainable part (`active = None`); each layer's own active
    state comes back afterwards. Layers merged into the base weights cannot be switched off: `merged_error`."""
    if any(layer.merged for layer in layers):
        raise ModelError(merged_error)
    saved = [layer.active for layer in layers]
    try:
        for layer in layers:
            layer.active = None
        yield model
    finally:
        for layer, active in zip(layers, saved):
            layer.active = active


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
