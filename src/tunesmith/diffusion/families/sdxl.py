"""SDXL (StableDiffusionXLPipeline): a UNet conditioned on two CLIP text towers (their penultimate hidden states side
by side), the second tower's pooled projection and each image's size/crop conditioning (the "time ids"); trained
with DDPM noising built from the folder's scheduler config (epsilon or v targets), sampled with the folder's own
scheduler through the pipeline's __call__. Prompts are encoded by the pipeline's encode_prompt."""

from __future__ import annotations

from pathlib import Path

import torch

from tunesmith.diffusion.families.base import Family, call_pipeline, load_pretrained

UNET_ATTENTION = ("to_k", "to_q", "to_v", "to_out.0")  # diffusers' train_dreambooth_lora_sdxl.py


class StableDiffusionXL(Family):
    name = "sdxl"
    pipeline_classes = ("StableDiffusionXLPipeline",)
    denoiser = "unet"
    text_encoders = ("text_encoder", "text_encoder_2")
    trainable_text_encoders = ("text_encoder", "text_encoder_2")
    denoiser_lora_targets = UNET_ATTENTION
    guidance_scale = 5.0

    def load(self, folder: Path, device=None):
        return load_pretrained(folder, device, "StableDiffusionXLPipeline", train_scheduler_class="DDPMScheduler")

    def resolution(self, pipe) -> int:
        return int(pipe.default_sample_size) * int(pipe.vae_scale_factor)

    def encode_text(self, pipe, prompts: list[str]) -> dict[str, torch.Tensor]:
        embeds, _, pooled, _ = pipe.encode_prompt(list(prompts), device=self.device(pipe), num_images_per_prompt=1,
                                                  do_classifier_free_guidance=False)
        return {"prompt_embeds": embeds, "pooled_prompt_embeds": pooled}

    def time_ids(self, pipe, micro: torch.Tensor | None, n: int, height: int, width: int) -> torch.Tensor:
        """(N, 6) through the pipeline's _get_add_time_ids, one image at a time; without `micro` each image is its
        own target size, uncropped."""
        if micro is None:
            micro = torch.tensor([[height, width, 0, 0, height, width]] * n)
        dim = int(pipe.text_encoder_2.config.projection_dim)
        rows = [[int(v) for v in row] for row in micro.tolist()]
        return torch.cat([pipe._get_add_time_ids(tuple(r[0:2]), tuple(r[2:4]), tuple(r[4:6]), torch.float32,
                                                 text_encoder_projection_dim=dim) for r in rows])

    def predict(self, pipe, noisy, timesteps, text, micro=None) -> torch.Tensor:
        scale = int(pipe.vae_scale_factor)
        ids = self.time_ids(pipe, micro, len(noisy), noisy.shape[-2] * scale, noisy.shape[-1] * scale)
        return pipe.unet(noisy, timesteps.to(noisy.device), encoder_hidden_states=text["prompt_embeds"],
                         added_cond_kwargs={"text_embeds": text["pooled_prompt_embeds"],
                                            "time_ids": ids.to(noisy.device)}).sample

    def sample(self, pipe, prompts, n, steps, guidance_scale, generator) -> torch.Tensor:
        return call_pipeline(pipe, prompts, n, steps, guidance_scale, generator, self.resolution(pipe))
