"""Where tensors live and in which precision they are computed: shared by the loop, the objectives and inference."""

from __future__ import annotations

from contextlib import nullcontext

import torch

from tunesmith.errors import ConfigError


def pick_device(name: str) -> torch.device:
    """`auto`: CUDA, else Apple's MPS, else the CPU; any other name as torch spells it."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        mps = getattr(torch.backends, "mps", None)
        if mps is not None and mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    return torch.device(name)


def available_devices() -> list[str]:
    """The device names this machine can run on: auto, cpu, then cuda and each cuda:N, then mps, where present."""
    names = ["auto", "cpu"]
    if torch.cuda.is_available():
        names += ["cuda"] + [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        names.append("mps")
    return names


def require_device(name: str, where: str = "--device") -> torch.device:
    """`pick_device(name)` when this machine has that device; a ConfigError naming `where` and what it has otherwise."""
    names = available_devices()
    if name in names:
        return pick_device(name)
    kind, _, index = name.partition(":")
    if kind == "cuda" and (index.isdigit() or not index):
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        why = f"this machine has {count} CUDA GPU(s)" if count else "no CUDA GPU is visible to torch here"
    elif name == "mps":
        why = "Apple's MPS is not available here"
    else:
        why = "not a device name (expected auto, cpu, cuda, cuda:N or mps)"
    raise ConfigError(f"{where} {name}: {why}; available: {', '.join(names)}")


def to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def autocast_for(cfg, device: torch.device):
    """bf16 autocast where `train.bf16` asks for it, else nothing."""
    if cfg.train.bf16:
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return nullcontext()
