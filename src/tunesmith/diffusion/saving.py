"""Trained weights in diffusers' formats. LoRA: one `pytorch_lora_weights.safetensors` with keys
`<component>.<module>.lora_A.weight` (component: unet or transformer, text_encoder, text_encoder_2) and the
adapter's settings in the file's `lora_adapter_metadata` (what diffusers' `load_lora_weights` reads). Full: a
pipeline folder (save_pretrained, safetensors) that is also a model folder tunesmith loads. Both written to a temp
folder and renamed into place."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from tunesmith.atomic import atomic_file, atomic_folder
from tunesmith.errors import ModelError, OutputDirError
from tunesmith.methods import lora

LORA_WEIGHTS = "pytorch_lora_weights.safetensors"
METADATA_KEY = "lora_adapter_metadata"


def lora_tensors(trained: dict[str, torch.nn.Module]) -> dict[str, torch.Tensor]:
    """The adapter weights only, by diffusers' key names."""
    out = {}
    for prefix, module in trained.items():
        for name, layer in lora.lora_layers(module).items():
            for suffix, tensor in layer.adapter_tensors(lora.DEFAULT).items():
                out[f"{prefix}.{name}.{suffix}"] = tensor.detach().cpu().contiguous()
    return out


def lora_metadata(family, trained: dict[str, torch.nn.Module], method) -> dict:
    from tunesmith.diffusion.trainable import targets

    meta = {}
    for prefix, module in trained.items():
        wanted = sorted(targets(family, prefix, method), key=len, reverse=True)
        suffix = lambda name: next((t for t in wanted if name == t or name.endswith("." + t)),  # noqa: E731
                                   name.rsplit(".", 1)[-1])
        meta.update({f"{prefix}.{k}": v for k, v in {
            "r": method.r, "lora_alpha": method.alpha, "lora_dropout": method.dropout,
            "target_modules": sorted({suffix(n) for n in lora.lora_layers(module)}),
            "init_lora_weights": True, "use_dora": False, "use_rslora": False, "bias": "none"}.items()})
    return meta


def save_lora(folder: Path, family, trained: dict[str, torch.nn.Module], method,
              kohya_name: str | None = None) -> Path:
    """The diffusers file, and the kohya single file named `kohya_name` too where the pipeline has that format."""
    from safetensors.torch import save_file

    from tunesmith.diffusion import kohya

    tensors, meta = lora_tensors(trained), lora_metadata(family, trained, method)
    with atomic_folder(folder) as tmp:
        save_file(tensors, str(tmp / LORA_WEIGHTS),
                  metadata={"format": "pt", METADATA_KEY: json.dumps(meta, sort_keys=True)})
        if kohya_name and kohya.supported(tensors):
            kohya.save_kohya(tmp / kohya_name, tensors, meta)
    return folder / LORA_WEIGHTS


def read_lora(folder: Path) -> tuple[dict[str, torch.Tensor], dict]:
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = Path(folder) / LORA_WEIGHTS
    if not path.is_file():
        raise ModelError(f"{folder}: no {LORA_WEIGHTS}")
    with safe_open(str(path), framework="pt") as fh:
        meta = json.loads((fh.metadata() or {}).get(METADATA_KEY, "{}"))
    return load_file(str(path)), meta


def export_kohya(source: str | Path, dest: str | Path, overwrite: bool = False) -> Path:
    """An existing run's LoRA (SOURCE: the run folder or its lora/ folder) as the kohya single file `dest`."""
    from tunesmith.diffusion import kohya

    source, dest = Path(source), Path(dest)
    folder = source / "lora" if (source / "lora").is_dir() else source
    if not (folder / LORA_WEIGHTS).is_file():
        raise ModelError(f"{source}: neither a LoRA diffusion run (a lora/ folder) nor a folder holding {LORA_WEIGHTS}")
    if dest.exists() and not overwrite:
        raise OutputDirError(f"{dest} already exists; pass --overwrite to replace it")
    tensors, meta = read_lora(folder)
    with atomic_file(dest) as tmp:
        kohya.save_kohya(tmp, tensors, meta)
    return dest


def load_lora(family, pipe, folder: Path) -> list[str]:
    """Put a saved LoRA (ours, or any diffusers LoRA in the same layout) onto the pipeline's denoiser and text
    encoders with tunesmith's LoRA layers; returns the components it touched."""
    from tunesmith.config.methods import LoraSettings

    tensors, meta = read_lora(folder)
    touched = []
    components = (family.denoiser, *family.text_encoders)
    for prefix in components:
        mine = {k[len(prefix) + 1:]: v for k, v in tensors.items() if k.startswith(prefix + ".")}
        if not mine:
            continue
        module = getattr(pipe, prefix)
        r = int(meta.get(f"{prefix}.r") or next(v.shape[0] for k, v in mine.items() if k.endswith("lora_A.weight")))
        alpha = float(meta.get(f"{prefix}.lora_alpha") or r)
        names = sorted({k.rsplit(".lora_", 1)[0] for k in mine})
        lora.apply(module, LoraSettings(r=r, alpha=alpha, dropout=0.0, target_modules=names))
        ours = {f"{name}.{suffix}": t for name, layer in lora.lora_layers(module).items()
                for suffix, t in layer.adapter_tensors(lora.DEFAULT).items()}
        lora.check_and_copy(folder, ours, mine)
        module.eval()
        touched.append(prefix)
    if not touched:
        raise ModelError(f"{folder}/{LORA_WEIGHTS}: no LoRA weights for this {family.name} pipeline's components "
                         f"({', '.join(c + '.*' for c in components)})")
    return touched


def save_full(folder: Path, family, pipe) -> Path:
    with atomic_folder(folder) as tmp:
        family.save_full(pipe, tmp)
    return folder
