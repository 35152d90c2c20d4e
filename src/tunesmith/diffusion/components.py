"""Load a Stable-Diffusion-style diffusers folder (unet/, text_encoder/, tokenizer/, scheduler/, optional vae/) or
the embedded default, and build the pipeline. A missing component is named."""

from __future__ import annotations

from pathlib import Path

from tunesmith.errors import ModelError

REQUIRED = ("unet", "text_encoder", "tokenizer", "scheduler")


def resolve_model(name: str, quiet: bool = False) -> Path:
    """`builtin:tiny-digits` → its cached folder (pretrained once); anything else: a local folder."""
    if name.startswith("builtin:"):
        from tunesmith.diffusion import tiny

        if name != f"builtin:{tiny.NAME}":
            raise ModelError(f"model: unknown builtin {name!r}; the embedded diffusion model is builtin:{tiny.NAME}")
        return tiny.ensure_pretrained(quiet=quiet)
    folder = Path(name)
    if not folder.is_dir():
        raise ModelError(f"model: {name} is not a folder; expected a diffusers Stable-Diffusion-style folder "
                         f"({', '.join(REQUIRED)}, optional vae/) or builtin:tiny-digits (nothing is downloaded)")
    return folder


def check_folder(folder: Path) -> None:
    missing = [c for c in REQUIRED if not (folder / c).is_dir()]
    if missing:
        raise ModelError(f"model: {folder} lacks the component folder(s) {', '.join(c + '/' for c in missing)}; a "
                         f"Stable-Diffusion-style folder has {', '.join(c + '/' for c in REQUIRED)} and optionally vae/")
    for sub, needs in (("unet", "config.json"), ("text_encoder", "config.json"), ("scheduler", "scheduler_config.json")):
        if not (folder / sub / needs).is_file():
            raise ModelError(f"model: {folder / sub} has no {needs}")


def load_pipeline(folder: str | Path, device=None):
    """The pipeline for training and sampling: a DDPM scheduler built from the folder's scheduler config (its
    prediction_type decides the training target) and a DDIM one for sampling, both from that config."""
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler, UNet2DConditionModel
    from transformers import AutoModel, AutoTokenizer

    from tunesmith.diffusion.pipeline import TextToImagePipeline

    folder = Path(folder)
    check_folder(folder)
    try:
        unet = UNet2DConditionModel.from_pretrained(folder / "unet", torch_dtype=torch.float32)
        text_encoder = AutoModel.from_pretrained(folder / "text_encoder", dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(folder / "tokenizer")
        train_scheduler = DDPMScheduler.from_pretrained(folder / "scheduler")
        vae = AutoencoderKL.from_pretrained(folder / "vae", torch_dtype=torch.float32) if (folder / "vae").is_dir() else None
    except (OSError, ValueError, KeyError) as e:
        raise ModelError(f"model: {folder}: could not load its components: {e}") from None
    sample_scheduler = DDIMScheduler.from_config(train_scheduler.config)
    pipe = TextToImagePipeline(unet=unet, text_encoder=text_encoder, tokenizer=tokenizer, scheduler=sample_scheduler,
                               vae=vae)
    pipe.set_progress_bar_config(disable=True)
    if device is not None:
        pipe.to(device)
    for module in (unet, text_encoder, vae):
        if module is not None:
            module.requires_grad_(False)
            module.eval()
    return pipe, train_scheduler
