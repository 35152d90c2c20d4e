"""Render prompts with a trained run (DreamBooth or text-to-image): its LoRA on the base model, or its full pipeline
folder."""

from __future__ import annotations

from pathlib import Path

import torch

from tunesmith.errors import ModelError


def run_settings(run_dir: Path) -> dict:
    """The run's config.yaml as written by the run (already validated then)."""
    import yaml

    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        raise ModelError(f"{run_dir}: no config.yaml, so the base model of its lora/ is unknown")
    return yaml.safe_load(path.read_text()) or {}


def load_trained(run_dir: str | Path, device=None):
    """(family, pipeline) of a finished run: run_dir/pipeline (full) or the base model plus run_dir/lora."""
    from tunesmith.devices import pick_device
    from tunesmith.diffusion.components import load_pipeline, resolve_model
    from tunesmith.diffusion.saving import load_lora

    run_dir = Path(run_dir)
    device = device or pick_device("auto")
    if (run_dir / "pipeline").is_dir():
        return load_pipeline(run_dir / "pipeline", device)[:2]
    if not (run_dir / "lora").is_dir():
        raise ModelError(f"{run_dir}: not a finished diffusion run (no lora/ or pipeline/ folder)")
    family, pipe, _ = load_pipeline(resolve_model(run_settings(run_dir).get("model", "")), device)
    load_lora(family, pipe, run_dir / "lora")
    pipe.to(device)
    return family, pipe


def run_guidance(run_dir: Path, family) -> float:
    """The run's sample.guidance_scale, else what its sampling used by default."""
    from tunesmith.diffusion.session import usual_guidance

    settings = run_settings(run_dir) if (Path(run_dir) / "config.yaml").is_file() else {}
    return usual_guidance(settings.get("model", ""), family, (settings.get("sample") or {}).get("guidance_scale"))


def generate(run_dir, prompts: list[str], out: Path, per_prompt: int = 4, steps: int = 25,
             guidance_scale: float | None = None, seed: int = 1234) -> Path:
    from tunesmith.diffusion.images import save_grid
    from tunesmith.diffusion.session import grid_scale

    family, pipe = load_trained(run_dir)
    scale = guidance_scale if guidance_scale is not None else run_guidance(Path(run_dir), family)
    generator = torch.Generator().manual_seed(seed)
    rows = [family.sample(pipe, [p], per_prompt, steps, scale, generator) for p in prompts]
    save_grid(Path(out), rows, grid_scale(family.resolution(pipe)))
    return Path(out)
