"""Stable Diffusion 1.x / 2.x (UNet2DConditionModel + one CLIP text encoder + optional VAE), and the embedded
pixel-space tiny model, through tunesmith's TextToImagePipeline (pipeline.py): a folder with unet/, text_encoder/,
tokenizer/, scheduler/ and optionally vae/. The training scheduler is DDPM built from the folder's scheduler config
(its prediction_type decides the target); sampling uses DDIM from the same config."""

from __future__ import annotations

from pathlib import Path

import torch

from tunesmith.diffusion.families.base import Family, freeze
from tunesmith.errors import ModelError

REQUIRED = ("unet", "text_encoder", "tokenizer", "scheduler")
UNET_ATTENTION = ("to_q", "to_k", "to_v", "to_out.0")


def check_folder(folder: Path) -> None:
    missing = [c for c in REQUIRED if not (folder / c).is_dir()]
    if missing:
        raise ModelError(f"model: {folder} lacks the component folder(s) {', '.join(c + '/' for c in missing)}; a "
                         f"Stable-Diffusion-style folder has {', '.join(c + '/' for c in REQUIRED)} and optionally vae/")
    for sub, needs in (("unet", "config.json"), ("text_encoder", "config.json"), ("scheduler", "scheduler_config.json")):
        if not (folder / sub / needs).is_file():
            raise ModelError(f"model: {folder / sub} has no {needs}")


class StableDiffusion(Family):
    name = "sd"
    pipeline_classes = ("TextToImagePipeline", "StableDiffusionPipeline")
    denoiser_lora_targets = UNET_ATTENTION
    guidance_scale = 7.5

    def load(self, folder: Path, device=None):
        from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler, UNet2DConditionModel
        from transformers import AutoModel, AutoTokenizer

        from tunesmith.diffusion.pipeline import TextToImagePipeline

        folder = Path(folder)
        check_folder(folder)
        try:
            unet = UNet2DConditionModel.from_pretrained(folder / "unet", dtype=torch.float32)
            text_encoder = AutoModel.from_pretrained(folder / "text_encoder", dtype=torch.float32)
            tokenizer = AutoTokenizer.from_pretrained(folder / "tokenizer")
            train_scheduler = DDPMScheduler.from_pretrained(folder / "scheduler")
            vae = AutoencoderKL.from_pretrained(folder / "vae", dtype=torch.float32) \
                if (folder / "vae").is_dir() else None
        except (OSError, ValueError, KeyError) as e:
            raise ModelError(f"model: {folder}: could not load its components: {e}") from None
        pipe = TextToImagePipeline(unet=unet, text_encoder=text_encoder, tokenizer=tokenizer,
                                   scheduler=DDIMScheduler.from_config(train_scheduler.config), vae=vae)
        pipe.set_progress_bar_config(disable=True)
        if device is not None:
            pipe.to(device)
        freeze(unet, text_encoder, vae)
        return pipe, train_scheduler

    def resolution(self, pipe) -> int:
        return pipe.resolution

    def channels(self, pipe) -> int:
        return int(pipe.vae.config.in_channels) if pipe.vae is not None else int(pipe.unet.config.in_channels)

    def encode_text(self, pipe, prompts: list[str]) -> dict[str, torch.Tensor]:
        return {"encoder_hidden_states": pipe.encode_prompt(prompts)}

    def predict(self, pipe, noisy, timesteps, text, micro=None) -> torch.Tensor:
        return pipe.unet(noisy, timesteps.to(noisy.device), encoder_hidden_states=text["encoder_hidden_states"]).sample

    def sample(self, pipe, prompts, n, steps, guidance_scale, generator) -> torch.Tensor:
        return pipe(prompts, num_inference_steps=steps, guidance_scale=guidance_scale, generator=generator,
                    num_images_per_prompt=n)

    def save_full(self, pipe, folder: Path) -> None:
        """With a VAE: a `StableDiffusionPipeline` folder (no safety checker), what diffusers and other tools load
        for SD 1.x/2.x; its scheduler a copy, since that pipeline updates outdated scheduler configs in place. The
        pixel-space model has no diffusers pipeline: it keeps tunesmith's TextToImagePipeline."""
        if pipe.vae is None:
            return super().save_full(pipe, folder)
        from diffusers import StableDiffusionPipeline

        StableDiffusionPipeline(vae=pipe.vae, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer, unet=pipe.unet,
                                scheduler=type(pipe.scheduler).from_config(pipe.scheduler.config), safety_checker=None,
                                feature_extractor=None, requires_safety_checker=False,
                                ).save_pretrained(folder, safe_serialization=True)
