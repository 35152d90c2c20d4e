"""Diffusion checkpoints: trainable weights, optimizer state, the EMA weights (if any), step and the RNG states (the
run's own generator and torch's), safetensors + JSON, written whole or not at all, listed and pruned as the text
loop's are (checkpoints.py)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from tunesmith.checkpoints import (checkpoint_path, list_checkpoints, new_checkpoint, optimizer_from_flat,
                                   optimizer_to_flat)

__all__ = ["list_checkpoints", "load", "save"]
OPTIMIZER = "optim."
EMA = "ema."


def save(run_dir: Path, step: int, params: dict[str, torch.nn.Parameter], optimizer, generator: torch.Generator,
         keep: int, ema=None) -> Path:
    from safetensors.torch import save_file

    tensors = {f"param.{n}": p.detach().cpu().contiguous() for n, p in params.items()}
    optimizer_tensors, optimizer_meta = optimizer_to_flat(optimizer.state_dict(), OPTIMIZER)
    tensors.update(optimizer_tensors)
    tensors["rng.generator"] = generator.get_state()
    tensors["rng.torch"] = torch.get_rng_state()
    if ema is not None:
        tensors.update({f"{EMA}{n}": t.detach().cpu().contiguous() for n, t in ema.state_dict().items()})
    with new_checkpoint(run_dir, step, keep) as tmp:
        save_file(tensors, str(tmp / "state.safetensors"))
        (tmp / "meta.json").write_text(json.dumps({"step": step, **optimizer_meta}))
    return checkpoint_path(run_dir, step)


def load(folder: Path, params: dict[str, torch.nn.Parameter], optimizer, generator: torch.Generator, ema=None) -> int:
    """Restore everything `save` wrote; returns the step it was taken at."""
    from safetensors.torch import load_file

    tensors = load_file(str(folder / "state.safetensors"))
    meta = json.loads((folder / "meta.json").read_text())
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(tensors[f"param.{n}"])
    optimizer.load_state_dict(optimizer_from_flat(tensors, meta, OPTIMIZER))
    generator.set_state(tensors["rng.generator"])
    torch.set_rng_state(tensors["rng.torch"])
    if ema is not None:
        ema.load_state_dict({n[len(EMA):]: t for n, t in tensors.items() if n.startswith(EMA)})
    return int(meta["step"])
