"""Where tensors live and in which precision they are computed: shared by the loop, the objectives and inference."""

from __future__ import annotations

from contextlib import nullcontext

import torch


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


def to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def autocast_for(cfg, device: torch.device):
    """bf16 autocast where `train.bf16` asks for it, else nothing."""
    if cfg.train.bf16:
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return nullcontext()
