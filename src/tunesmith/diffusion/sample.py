"""Render prompts with a trained run: its LoRA on the base model, or its full pipeline folder."""

from __future__ import annotations

from pathlib import Path

import torch

from tunesmith.errors import ModelError


def load_trained(run_dir: str | Path, device=None):
    """The pipeline of a finished run: run_dir/pipeline (full) or the base model plus run_dir/lora."""
    from tunesmith.devices import pick_device
    from tunesmith.diffusion.components import load_pipeline, resolve_model
    from tunesmith.diffusion.config import load_dreambooth_config
    from tunesmith.diffusion.saving import load_lora

    run_dir = Path(run_dir)
    device = device or pick_device("auto")
    if (run_dir / "pipeline").is_dir():
        return load_pipeline(run_dir / "pipeline", device)[0]
    if not (run_dir / "lora").is_dir():
        raise ModelError(f"{run_dir}: not a finished DreamBooth run (no lora/ or pipeline/ folder)")
    if not (run_dir / "config.yaml").is_file():
        raise ModelError(f"{run_dir}: no config.yaml, so the base model of its lora/ is unknown")
    cfg = load_dreambooth_config(run_dir / "config.yaml")
    pipe = load_pipeline(resolve_model(cfg.model), device)[0]
    load_lora(pipe, run_dir / "lora")
    pipe.to(device)
    return pipe


def generate(run_dir, prompts: list[str], out: Path, per_prompt: int = 4, steps: int = 25, guidance_scale: float = 1.0,
             seed: int = 1234) -> Path:
    from tunesmith.diffusion.images import save_grid

    pipe = load_trained(run_dir)
    generator = torch.Generator().manual_seed(seed)
    rows = [pipe(p, num_inference_steps=steps, guidance_scale=guidance_scale, generator=generator,
                 num_images_per_prompt=per_prompt) for p in prompts]
    from tunesmith.diffusion.run import grid_scale

    save_grid(Path(out), rows, grid_scale(pipe.resolution))
    return Path(out)
