"""DreamBooth checkpoints: trainable weights, optimizer state, step and the RNG states (the run's own generator and
torch's), safetensors + JSON, written to a temp folder and renamed into place, so a crash never leaves half of one."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from tunesmith.atomic import atomic_folder

CHECKPOINTS = "checkpoints"


def save(run_dir: Path, step: int, params: dict[str, torch.nn.Parameter], optimizer, generator: torch.Generator,
         keep: int) -> Path:
    from safetensors.torch import save_file

    tensors = {f"param.{n}": p.detach().cpu().contiguous() for n, p in params.items()}
    sd = optimizer.state_dict()
    scalars = {}
    for idx, state in sd["state"].items():
        for key, value in state.items():
            if torch.is_tensor(value):
                tensors[f"optim.{idx}.{key}"] = value.detach().cpu().contiguous()
            else:
                scalars[f"{idx}.{key}"] = value
    tensors["rng.generator"] = generator.get_state()
    tensors["rng.torch"] = torch.get_rng_state()
    meta = {"step": step, "param_groups": sd["param_groups"], "scalars": scalars}
    final = run_dir / CHECKPOINTS / f"step-{step:07d}"
    with atomic_folder(final) as tmp:
        save_file(tensors, str(tmp / "state.safetensors"))
        (tmp / "meta.json").write_text(json.dumps(meta))
    for old in list_checkpoints(run_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(run_dir: Path) -> list[Path]:
    root = run_dir / CHECKPOINTS
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.name.startswith("step-") and (p / "meta.json").is_file())


def load(folder: Path, params: dict[str, torch.nn.Parameter], optimizer, generator: torch.Generator) -> int:
    """Restore everything `save` wrote; returns the step it was taken at."""
    from safetensors.torch import load_file

    tensors = load_file(str(folder / "state.safetensors"))
    meta = json.loads((folder / "meta.json").read_text())
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(tensors[f"param.{n}"])
    state: dict[int, dict] = {}
    for key, value in tensors.items():
        if key.startswith("optim."):
            _, idx, name = key.split(".", 2)
            state.setdefault(int(idx), {})[name] = value
    for key, value in meta["scalars"].items():
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = value
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    generator.set_state(tensors["rng.generator"])
    torch.set_rng_state(tensors["rng.torch"])
    return int(meta["step"])
