"""The seam between a diffusers pipeline kind and tunesmith's diffusion training: what trains, how prompts and images
become the denoiser's inputs, one denoising prediction, and sampling. The training loop, DreamBooth, text-to-image,
LoRA and saving see only this interface; each pipeline kind (sd.py, sdxl.py, sd3.py, flux.py) implements it.

Conventions every family keeps:
- `encode_text` returns batch-first tensors (a dict the family's own `predict` reads); it is differentiable when a
  text encoder trains, and the loop calls it under no_grad otherwise.
- `encode_images` takes pixels in [-1, 1] and returns what the denoiser denoises, unpacked (N, C, h, w): VAE latents
  scaled (and shifted) as the pipeline expects, or the pixels themselves in pixel space.
- `predict(noisy, timesteps, text, micro)` returns a tensor shaped like `noisy`; timesteps are noise.Noising's.
  `micro` is SDXL's per-image size conditioning, (N, 6): original h, w, crop top, left, target h, w (None: the
  image was resized square to the target, no crop).
- `sample` returns (N, C, H, W) in [0, 1] on the CPU; its initial noise comes from the given CPU generator, so a
  seed gives the same images on every device."""

from __future__ import annotations

from pathlib import Path

import torch

from tunesmith.errors import ModelError

CLIP_ATTENTION = ["q_proj", "k_proj", "v_proj", "out_proj"]


class Family:
    name: str = ""
    pipeline_classes: tuple[str, ...] = ()   # model_index.json `_class_name`s this family loads
    denoiser: str = "unet"                   # the pipeline attribute that trains
    text_encoders: tuple[str, ...] = ("text_encoder",)
    trainable_text_encoders: tuple[str, ...] = ("text_encoder",)  # what train_text_encoder trains (not T5)
    denoiser_lora_targets: tuple[str, ...] = ()
    text_lora_targets: tuple[str, ...] = tuple(CLIP_ATTENTION)
    guidance_scale: float = 7.5              # the pipeline's usual classifier-free guidance

    def matches(self, model_index: dict) -> bool:
        return model_index.get("_class_name") in self.pipeline_classes

    def configured(self, train) -> "Family":
        """This family with a run's training settings (`train`: config.TrainSettings) it reads, if any."""
        return self

    def load(self, folder: Path, device=None):
        """(pipeline, training scheduler): every component frozen, in eval mode, fp32."""
        raise NotImplementedError

    def denoiser_module(self, pipe) -> torch.nn.Module:
        return getattr(pipe, self.denoiser)

    def device(self, pipe) -> torch.device:
        return self.denoiser_module(pipe).device

    def resolution(self, pipe) -> int:
        raise NotImplementedError

    def channels(self, pipe) -> int:
        """Image channels (RGB 3; the tiny pixel-space model may be 1 or 3)."""
        return int(pipe.vae.config.in_channels) if getattr(pipe, "vae", None) is not None else 3

    def pixel_multiple(self, pipe) -> int:
        """Image sides must be multiples of this: the VAE's downscale × the denoiser's (a UNet's downsamplings, a
        transformer's patch size)."""
        vae = getattr(pipe, "vae", None)
        scale = 2 ** (len(vae.config.block_out_channels) - 1) if vae is not None else 1
        config = self.denoiser_module(pipe).config
        if "block_out_channels" in config:
            return scale * 2 ** (len(config.block_out_channels) - 1)
        return scale * int(config.get("patch_size", 1) or 1)

    def encode_text(self, pipe, prompts: list[str]) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def encode_images(self, pipe, pixels: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        from tunesmith.diffusion.latents import draw, posterior

        vae = getattr(pipe, "vae", None)
        if vae is None:
            return pixels.to(self.device(pipe))
        return draw(vae, *posterior(vae, pixels, len(pixels)), generator)

    def predict(self, pipe, noisy: torch.Tensor, timesteps: torch.Tensor, text: dict[str, torch.Tensor],
                micro: torch.Tensor | None = None) -> torch.Tensor:
        raise NotImplementedError

    def sample(self, pipe, prompts: list[str], n: int, steps: int, guidance_scale: float,
               generator: torch.Generator) -> torch.Tensor:
        raise NotImplementedError

    def save_full(self, pipe, folder: Path) -> None:
        """A fully fine-tuned pipeline as a folder that diffusers' `DiffusionPipeline.from_pretrained` and this
        family's `load` read (safetensors)."""
        pipe.save_pretrained(folder, safe_serialization=True)


def freeze(*modules) -> None:
    for module in modules:
        if module is not None:
            module.requires_grad_(False)
            module.eval()


def load_pretrained(folder: Path, device, pipeline_class: str, train_scheduler_class: str | None = None):
    """(pipeline, training scheduler) of a diffusers pipeline folder loaded through its own class: fp32, every
    component frozen and in eval mode, no sampling progress bar. The training scheduler is `train_scheduler_class`
    built from the folder's scheduler config (None: a copy of the folder's scheduler)."""
    import json

    import diffusers

    index = json.loads((Path(folder) / "model_index.json").read_text())
    missing = [name for name, entry in index.items() if not name.startswith("_") and isinstance(entry, list)
               and entry[0] is not None and not (Path(folder) / name).is_dir()]
    if missing:
        raise ModelError(f"model: {folder}/model_index.json names the component(s) {', '.join(missing)} of a "
                         f"{pipeline_class}, but the folder lacks {', '.join(m + '/' for m in missing)}")
    try:
        pipe = getattr(diffusers, pipeline_class).from_pretrained(folder, dtype=torch.float32)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ModelError(f"model: {folder}: could not load it as a {pipeline_class}: {e}") from None
    config = pipe.scheduler.config
    scheduler = (getattr(diffusers, train_scheduler_class).from_config(config) if train_scheduler_class
                 else type(pipe.scheduler).from_config(config))
    pipe.set_progress_bar_config(disable=True)
    if device is not None:
        pipe.to(device)
    freeze(*(c for c in pipe.components.values() if isinstance(c, torch.nn.Module)))
    return pipe, scheduler


def text_tokens(tokenizer, pipeline_default: int) -> int:
    """T5's sequence length: the pipeline's default (SD3 256, Flux 512) unless the tokenizer reads fewer."""
    return min(pipeline_default, int(getattr(tokenizer, "model_max_length", pipeline_default) or pipeline_default))


def call_pipeline(pipe, prompts: list[str], n: int, steps: int, guidance_scale: float, generator: torch.Generator,
                  side: int, **extra) -> torch.Tensor:
    """Sampling through the diffusers pipeline's own __call__: (N, C, side, side) in [0, 1] on the CPU."""
    out = pipe(prompt=list(prompts), num_images_per_prompt=n, num_inference_steps=steps, guidance_scale=guidance_scale,
               generator=generator, height=side, width=side, output_type="pt", **extra)
    return out.images.float().cpu()
