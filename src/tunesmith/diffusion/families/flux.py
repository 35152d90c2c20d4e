"""Flux (FluxPipeline): a transformer over 2x2-packed latents (the pipeline's _pack_latents / _unpack_latents and
rotary position ids), conditioned on T5's sequence and CLIP's pooled embedding and, on guidance-distilled models
(Flux-dev), a guidance embedding: training feeds it `train_guidance` (1 by default, as diffusers' Flux training
examples run), sampling the sampling guidance. Flow matching with the folder's FlowMatchEulerDiscreteScheduler; the
transformer takes timesteps / 1000. T5 never trains (as in diffusers' scripts)."""

from __future__ import annotations

import copy
from pathlib import Path

import torch

from tunesmith.diffusion.families.base import Family, call_pipeline, load_pretrained, text_tokens

# diffusers' train_dreambooth_lora_flux.py: attention (image and context streams) and both feed-forwards
FLUX_LAYERS = ("attn.to_k", "attn.to_q", "attn.to_v", "attn.to_out.0", "attn.add_k_proj", "attn.add_q_proj",
               "attn.add_v_proj", "attn.to_add_out", "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj",
               "ff_context.net.2")
T5_TOKENS = 512  # FluxPipeline's max_sequence_length


class Flux(Family):
    name = "flux"
    pipeline_classes = ("FluxPipeline",)
    denoiser = "transformer"
    text_encoders = ("text_encoder", "text_encoder_2")
    trainable_text_encoders = ("text_encoder",)
    denoiser_lora_targets = FLUX_LAYERS
    guidance_scale = 3.5
    train_guidance = 1.0

    def configured(self, train) -> "Flux":
        family = copy.copy(self)
        family.train_guidance = float(train.guidance_embedding)
        return family

    def load(self, folder: Path, device=None):
        return load_pretrained(folder, device, "FluxPipeline")

    def resolution(self, pipe) -> int:
        """The VAE's sample size (1024 for Flux's): FluxPipeline has no size of its own beyond a fixed 128 latents."""
        return int(pipe.vae.config.sample_size)

    def pixel_multiple(self, pipe) -> int:
        return int(pipe.vae_scale_factor) * 2 * int(pipe.transformer.config.patch_size or 1)

    def t5_tokens(self, pipe) -> int:
        return text_tokens(pipe.tokenizer_2, T5_TOKENS)

    def encode_text(self, pipe, prompts: list[str]) -> dict[str, torch.Tensor]:
        embeds, pooled, ids = pipe.encode_prompt(list(prompts), prompt_2=None, device=self.device(pipe),
                                                 num_images_per_prompt=1, max_sequence_length=self.t5_tokens(pipe))
        return {"prompt_embeds": embeds, "pooled_prompt_embeds": pooled, "txt_ids": ids.expand(len(embeds), -1, -1)}

    def predict(self, pipe, noisy, timesteps, text, micro=None) -> torch.Tensor:
        from diffusers import FluxPipeline

        n, channels, height, width = noisy.shape
        device = noisy.device
        guidance = None
        if pipe.transformer.config.guidance_embeds:
            guidance = torch.full((n,), self.train_guidance, device=device)
        out = pipe.transformer(hidden_states=FluxPipeline._pack_latents(noisy, n, channels, height, width),
                               timestep=timesteps.to(device) / 1000, guidance=guidance,
                               pooled_projections=text["pooled_prompt_embeds"],
                               encoder_hidden_states=text["prompt_embeds"], txt_ids=text["txt_ids"][0],
                               img_ids=FluxPipeline._prepare_latent_image_ids(n, height // 2, width // 2, device,
                                                                              noisy.dtype)).sample
        scale = int(pipe.vae_scale_factor)
        return FluxPipeline._unpack_latents(out, height * scale, width * scale, scale)

    def sample(self, pipe, prompts, n, steps, guidance_scale, generator) -> torch.Tensor:
        return call_pipeline(pipe, prompts, n, steps, guidance_scale, generator, self.resolution(pipe),
                             max_sequence_length=self.t5_tokens(pipe))
