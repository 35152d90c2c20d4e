"""The checkpoint folders the text and the DreamBooth loops share: run_dir/checkpoints/step-NNNNNNN, each written
whole or not at all (atomic.atomic_folder), listed in step order, the oldest pruned past `keep`; and an optimizer's
state dict as safetensors tensors plus JSON (no pickle) and back. What each loop stores besides is its own
(train/checkpoint.py, diffusion/checkpoint.py)."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from tunesmith.atomic import atomic_folder

CHECKPOINTS = "checkpoints"


def list_checkpoints(run_dir: Path) -> list[Path]:
    """The run's complete checkpoints, oldest first (a temp folder being written is not one)."""
    root = run_dir / CHECKPOINTS
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.name.startswith("step-") and (p / "meta.json").is_file())


def checkpoint_path(run_dir: Path, step: int) -> Path:
    return run_dir / CHECKPOINTS / f"step-{step:07d}"


@contextmanager
def new_checkpoint(run_dir: Path, step: int, keep: int) -> Iterator[Path]:
    """Yield a temp folder for step `step`'s checkpoint (a listed one has a meta.json); on success it becomes
    checkpoint_path(run_dir, step), replacing one of that step, and only the newest `keep` remain."""
    with atomic_folder(checkpoint_path(run_dir, step)) as tmp:
        yield tmp
    for old in list_checkpoints(run_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def optimizer_to_flat(sd: dict, prefix: str) -> tuple[dict[str, torch.Tensor], dict]:
    """An optimizer state dict → tensors named `{prefix}{param index}.{key}` and JSON (param_groups, scalars)."""
    tensors, scalars = {}, {}
    for idx, state in sd["state"].items():
        for key, value in state.items():
            if torch.is_tensor(value):
                tensors[f"{prefix}{idx}.{key}"] = value.detach().cpu().contiguous()
            else:
                scalars[f"{idx}.{key}"] = value
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def optimizer_from_flat(tensors: dict[str, torch.Tensor], meta: dict, prefix: str) -> dict:
    """The state dict `optimizer_to_flat` flattened, from its tensors (others ignored) and its JSON."""
    state: dict[int, dict] = {}
    for key, value in tensors.items():
        if key.startswith(prefix):
            idx, name = key.removeprefix(prefix).split(".", 1)
            state.setdefault(int(idx), {})[name] = value
    for key, value in meta["scalars"].items():
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = value
    return {"state": state, "param_groups": meta["param_groups"]}
