"""Checkpoints: trainable weights, optimizer, scheduler, RNG and data position; safetensors + JSON, no pickle.

Written whole or not at all, listed and pruned as DreamBooth's are (checkpoints.py). In a distributed run the
full (consolidated) state is gathered on rank 0, which alone writes, in the same layout one process writes, so a
checkpoint resumes on any number of ranks (train/distributed.py).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import torch

from tunesmith.checkpoints import (checkpoint_path, list_checkpoints, new_checkpoint, optimizer_from_flat,
                                   optimizer_to_flat)
from tunesmith.train.distributed import OneProcess

__all__ = ["list_checkpoints", "load_checkpoint", "save_checkpoint"]
OPTIMIZER = "optimizer."
CUDA_RNG = "rng.cuda."


def rng_state() -> tuple[dict[str, torch.Tensor], dict]:
    tensors = {"rng.torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"{CUDA_RNG}{i}"] = s
    np_state = np.random.get_state()
    meta = {"python": repr(random.getstate()),
            "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])]}
    return tensors, meta


def restore_rng(tensors: dict, meta: dict) -> str | None:
    """Restore the RNG states; each saved CUDA state goes to the GPU of its number where this machine has one.
    Returns a line saying which were dropped or left fresh when the GPU counts differ, else None."""
    import ast

    torch.set_rng_state(tensors["rng.torch"])
    saved = sorted(int(k.removeprefix(CUDA_RNG)) for k in tensors if k.startswith(CUDA_RNG))
    here = torch.cuda.device_count() if torch.cuda.is_available() else 0
    for i in saved:
        if i < here:
            torch.cuda.set_rng_state(tensors[f"{CUDA_RNG}{i}"], i)
    random.setstate(ast.literal_eval(meta["python"]))
    n = meta["numpy"]
    np.random.set_state((n[0], np.array(n[1], dtype=np.uint32), n[2], n[3], n[4]))
    dropped = [f"cuda:{i}" for i in saved if i >= here]
    fresh = [f"cuda:{i}" for i in range(here) if i not in saved]
    parts = ([f"dropped the states of {', '.join(dropped)}"] if dropped else []) + (
        [f"{', '.join(fresh)} start from fresh states"] if fresh else [])
    if not parts:
        return None
    return (f"the checkpoint holds the CUDA RNG states of {len(saved)} GPU(s), this machine has {here}: "
            + "; ".join(parts))


def save_checkpoint(run_dir: Path, step: int, model, optimizer, scheduler, data_position: int, keep: int,
                    ranks=None) -> Path | None:
    """Every rank calls it (the state is gathered from all of them); the main rank writes and returns the folder."""
    from safetensors.torch import save_file

    ranks = ranks or OneProcess()
    tensors = {f"model.{n}": t for n, t in ranks.trainable_state(model).items()}
    optimizer_state = ranks.optimizer_state(optimizer)  # a collective under FSDP: every rank takes part
    if not ranks.main:
        return None
    opt_tensors, opt_meta = optimizer_to_flat(optimizer_state, OPTIMIZER)
    rng_tensors, rng_meta = rng_state()
    with new_checkpoint(run_dir, step, keep) as tmp:
        save_file({**tensors, **opt_tensors, **rng_tensors}, str(tmp / "state.safetensors"))
        meta = {"step": step, "data_position": data_position, "optimizer": opt_meta,
                "scheduler": scheduler.state_dict(), "rng": rng_meta}
        (tmp / "meta.json").write_text(json.dumps(meta))
    return checkpoint_path(run_dir, step)


def load_checkpoint(folder: Path, model, optimizer, scheduler, ranks=None) -> dict:
    """Every rank reads the checkpoint and restores its part: the weights, the optimizer state, the schedule, the RNG
    (the main rank's, when it was written by several). The returned meta's `rng_note` says which GPUs' RNG states
    were dropped or left fresh when this machine has another number of GPUs (None otherwise)."""
    from safetensors.torch import load_file

    ranks = ranks or OneProcess()
    tensors = load_file(str(folder / "state.safetensors"))
    meta = json.loads((folder / "meta.json").read_text())
    ranks.load_trainable(model, {k.removeprefix("model."): v for k, v in tensors.items() if k.startswith("model.")})
    ranks.load_optimizer(optimizer, optimizer_from_flat(tensors, meta["optimizer"], OPTIMIZER))
    scheduler.load_state_dict(meta["scheduler"])
    meta["rng_note"] = restore_rng(tensors, meta["rng"])
    return meta
