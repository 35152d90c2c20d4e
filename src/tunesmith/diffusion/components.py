"""Resolve the model name (a diffusers pipeline folder or the embedded default) and load it through its pipeline
family (families/)."""

from __future__ import annotations

from pathlib import Path

from tunesmith.errors import ModelError


def resolve_model(name: str, quiet: bool = False) -> Path:
    """`builtin:tiny-digits` → its cached folder (pretrained once); anything else: a local folder."""
    if name.startswith("builtin:"):
        from tunesmith.diffusion import tiny

        if name != f"builtin:{tiny.NAME}":
            raise ModelError(f"model: unknown builtin {name!r}; the embedded diffusion model is builtin:{tiny.NAME}")
        return tiny.ensure_pretrained(quiet=quiet)
    folder = Path(name)
    if not folder.is_dir():
        raise ModelError(f"model: {name} is not a folder; expected a diffusers pipeline folder "
                         "(Stable Diffusion 1.x/2.x, SDXL, SD3 or Flux) or builtin:tiny-digits (nothing is downloaded)")
    return folder


def load_pipeline(folder: str | Path, device=None):
    """(family, pipeline, training scheduler) for a model folder: the family from its model_index.json."""
    from tunesmith.diffusion.families import detect

    family = detect(folder)
    pipe, scheduler = family.load(Path(folder), device)
    return family, pipe, scheduler
