"""The pipeline kinds tunesmith trains (base.py: the interface). `detect(folder)` picks one from the folder's
model_index.json (`_class_name`); a folder without one is read as Stable-Diffusion-style."""

from __future__ import annotations

import json
from pathlib import Path

from tunesmith.diffusion.families.base import Family
from tunesmith.diffusion.families.flux import Flux
from tunesmith.diffusion.families.sd import StableDiffusion
from tunesmith.diffusion.families.sd3 import StableDiffusion3
from tunesmith.diffusion.families.sdxl import StableDiffusionXL
from tunesmith.errors import ModelError

FAMILIES: list[Family] = [StableDiffusion(), StableDiffusionXL(), StableDiffusion3(), Flux()]


def by_name(name: str) -> Family:
    for family in FAMILIES:
        if family.name == name:
            return family
    raise ModelError(f"unknown diffusion pipeline kind {name!r}; known: {', '.join(f.name for f in FAMILIES)}")


def detect(folder: str | Path) -> Family:
    index_file = Path(folder) / "model_index.json"
    if not index_file.is_file():
        return by_name("sd")
    try:
        index = json.loads(index_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ModelError(f"model: {index_file} is not valid JSON ({e})") from None
    for family in FAMILIES:
        if family.matches(index):
            return family
    known = ", ".join(c for f in FAMILIES for c in f.pipeline_classes)
    raise ModelError(f"model: {index_file} names the pipeline {index.get('_class_name')!r}, which tunesmith does not "
                     f"train; supported: {known}")
