"""A text-to-image pipeline over a Stable-Diffusion-style set of components, with or without a VAE: without one the
UNet denoises pixels. It is a diffusers `DiffusionPipeline` (save_pretrained / from_pretrained of a pipeline folder)
and carries diffusers' `StableDiffusionLoraLoaderMixin`, so `pipe.load_lora_weights(folder)` loads a saved LoRA."""

from __future__ import annotations

import torch
from diffusers import DiffusionPipeline
from diffusers.loaders import StableDiffusionLoraLoaderMixin


class TextToImagePipeline(DiffusionPipeline, StableDiffusionLoraLoaderMixin):
    model_cpu_offload_seq = "text_encoder->unet->vae"
    _optional_components = ["vae"]

    def __init__(self, unet, text_encoder, tokenizer, scheduler, vae=None):
        super().__init__()
        self.register_modules(unet=unet, text_encoder=text_encoder, tokenizer=tokenizer, scheduler=scheduler, vae=vae)

    @property
    def scale_factor(self) -> int:
        """Pixels per UNet cell: 2^(VAE levels - 1), 1 in pixel space."""
        if self.vae is None:
            return 1
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def resolution(self) -> int:
        return int(self.unet.config.sample_size) * self.scale_factor

    def tokenize(self, prompts: list[str]) -> torch.Tensor:
        length = min(int(getattr(self.tokenizer, "model_max_length", 77) or 77), 77)
        return self.tokenizer(prompts, padding="max_length", max_length=length, truncation=True,
                              return_tensors="pt").input_ids

    def encode_prompt(self, prompts: list[str]) -> torch.Tensor:
        ids = self.tokenize(prompts).to(self.text_encoder.device)
        return self.text_encoder(ids)[0]

    def to_pixels(self, latents: torch.Tensor) -> torch.Tensor:
        if self.vae is None:
            return latents
        return self.vae.decode(latents / self.vae.config.scaling_factor).sample

    @torch.no_grad()
    def __call__(self, prompt: str | list[str], num_inference_steps: int = 25, guidance_scale: float = 1.0,
                 generator: torch.Generator | None = None, num_images_per_prompt: int = 1) -> torch.Tensor:
        """Images as a float tensor (N, C, H, W) in [0, 1]; N = prompts × num_images_per_prompt. The initial noise
        comes from `generator` on the CPU, so a seed gives the same images on every device."""
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        prompts = [p for p in prompts for _ in range(num_images_per_prompt)]
        device = self.unet.device
        cond = self.encode_prompt(prompts)
        if guidance_scale > 1.0:
            cond = torch.cat([self.encode_prompt([""] * len(prompts)), cond])
        size = int(self.unet.config.sample_size)
        shape = (len(prompts), int(self.unet.config.in_channels), size, size)
        latents = torch.randn(shape, generator=generator, dtype=torch.float32).to(device)
        self.scheduler.set_timesteps(num_inference_steps, device=device)
        latents = latents * self.scheduler.init_noise_sigma
        for t in self.scheduler.timesteps:
            x = torch.cat([latents] * 2) if guidance_scale > 1.0 else latents
            x = self.scheduler.scale_model_input(x, t)
            out = self.unet(x, t, encoder_hidden_states=cond.to(self.unet.dtype)).sample.float()
            if guidance_scale > 1.0:
                uncond, text = out.chunk(2)
                out = uncond + guidance_scale * (text - uncond)
            latents = self.scheduler.step(out, t, latents, generator=generator).prev_sample
        pixels = self.to_pixels(latents.to(self.unet.dtype)).float()
        return ((pixels.clamp(-1, 1) + 1) / 2).cpu()
