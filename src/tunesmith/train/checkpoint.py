"""Checkpoints: trainable weights, optimizer, scheduler, RNG and data position; safetensors + JSON, no pickle.

Written to a temp folder, fsynced, then renamed, so a crash never leaves a half checkpoint. In a distributed run the
full (consolidated) state is gathered on rank 0, which alone writes, in the same layout one process writes, so a
checkpoint resumes on any number of ranks (train/distributed.py).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch

from tunesmith.atomic import fsync_tree
from tunesmith.train.distributed import OneProcess

CHECKPOINTS = "checkpoints"


def _optimizer_to_flat(sd: dict) -> tuple[dict[str, torch.Tensor], dict]:
    tensors, scalars = {}, {}
    for idx, state in sd["state"].items():
        for key, value in state.items():
            if torch.is_tensor(value):
                tensors[f"optimizer.{idx}.{key}"] = value.detach().cpu().contiguous()
            else:
                scalars[f"{idx}.{key}"] = value
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def _optimizer_from_flat(tensors: dict, meta: dict) -> dict:
    state: dict[int, dict] = {}
    for key, value in tensors.items():
        if key.startswith("optimizer."):
            _, idx, name = key.split(".", 2)
            state.setdefault(int(idx), {})[name] = value
    for key, value in meta["scalars"].items():
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = value
    return {"state": state, "param_groups": meta["param_groups"]}


def rng_state() -> tuple[dict[str, torch.Tensor], dict]:
    tensors = {"rng.torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = s
    np_state = np.random.get_state()
    meta = {"python": repr(random.getstate()),
            "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])]}
    return tensors, meta


def restore_rng(tensors: dict, meta: dict) -> None:
    import ast

    torch.set_rng_state(tensors["rng.torch"])
    if torch.cuda.is_available():
        cuda = [tensors[k] for k in sorted(k for k in tensors if k.startswith("rng.cuda."))]
        if cuda:
            torch.cuda.set_rng_state_all(cuda)
    random.setstate(ast.literal_eval(meta["python"]))
    n = meta["numpy"]
    np.random.set_state((n[0], np.array(n[1], dtype=np.uint32), n[2], n[3], n[4]))


def save_checkpoint(run_dir: Path, step: int, model, optimizer, scheduler, data_position: int, keep: int,
                    ranks=None) -> Path | None:
    """Every rank calls it (the state is gathered from all of them); the main rank writes and returns the folder."""
    from safetensors.torch import save_file

    ranks = ranks or OneProcess()
    tensors = {f"model.{n}": t for n, t in ranks.trainable_state(model).items()}
    optimizer_state = ranks.optimizer_state(optimizer)  # a collective under FSDP: every rank takes part
    if not ranks.main:
        return None
    opt_tensors, opt_meta = _optimizer_to_flat(optimizer_state)
    root = run_dir / CHECKPOINTS
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".step-", dir=root))
    try:
        rng_tensors, rng_meta = rng_state()
        save_file({**tensors, **opt_tensors, **rng_tensors}, str(tmp / "state.safetensors"))
        meta = {"step": step, "data_position": data_position, "optimizer": opt_meta,
                "scheduler": scheduler.state_dict(), "rng": rng_meta}
        (tmp / "meta.json").write_text(json.dumps(meta))
        fsync_tree(tmp)
        final = root / f"step-{step:07d}"
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for old in list_checkpoints(run_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(run_dir: Path) -> list[Path]:
    root = run_dir / CHECKPOINTS
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.name.startswith("step-") and (p / "meta.json").is_file())


def load_checkpoint(folder: Path, model, optimizer, scheduler, ranks=None) -> dict:
    """Every rank reads the checkpoint and restores its part: the weights, the optimizer state, the schedule, the RNG
    (the main rank's, when it was written by several)."""
    from safetensors.torch import load_file

    ranks = ranks or OneProcess()
    tensors = load_file(str(folder / "state.safetensors"))
    meta = json.loads((folder / "meta.json").read_text())
    ranks.load_trainable(model, {k.removeprefix("model."): v for k, v in tensors.items() if k.startswith("model.")})
    ranks.load_optimizer(optimizer, _optimizer_from_flat(tensors, meta["optimizer"]))
    scheduler.load_state_dict(meta["scheduler"])
    restore_rng(tensors, meta["rng"])
    return meta
