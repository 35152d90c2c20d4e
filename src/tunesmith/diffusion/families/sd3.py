"""Stable Diffusion 3 (StableDiffusion3Pipeline): an MMDiT transformer over the VAE's shifted and scaled latents,
conditioned on the pipeline's joint prompt encoding (two CLIP towers side by side, padded to T5's width, then T5's
sequence) and the CLIP towers' pooled projections; flow matching with the folder's FlowMatchEulerDiscreteScheduler,
sampled through the pipeline's __call__. T5 never trains (as in diffusers' scripts)."""

from __future__ import annotations

from pathlib import Path

import torch

from tunesmith.diffusion.families.base import Family, call_pipeline, load_pretrained, text_tokens

# diffusers' train_dreambooth_lora_sd3.py: the joint attention's image and context projections
SD3_ATTENTION = ("attn.add_k_proj", "attn.add_q_proj", "attn.add_v_proj", "attn.to_add_out", "attn.to_k",
                 "attn.to_out.0", "attn.to_q", "attn.to_v")
T5_TOKENS = 256  # StableDiffusion3Pipeline's max_sequence_length


class StableDiffusion3(Family):
    name = "sd3"
    pipeline_classes = ("StableDiffusion3Pipeline",)
    denoiser = "transformer"
    text_encoders = ("text_encoder", "text_encoder_2", "text_encoder_3")
    trainable_text_encoders = ("text_encoder", "text_encoder_2")
    denoiser_lora_targets = SD3_ATTENTION
    guidance_scale = 7.0

    def load(self, folder: Path, device=None):
        return load_pretrained(folder, device, "StableDiffusion3Pipeline")

    def resolution(self, pipe) -> int:
        return int(pipe.default_sample_size) * int(pipe.vae_scale_factor)

    def t5_tokens(self, pipe) -> int:
        return text_tokens(pipe.tokenizer_3, T5_TOKENS)

    def encode_text(self, pipe, prompts: list[str]) -> dict[str, torch.Tensor]:
        embeds, _, pooled, _ = pipe.encode_prompt(list(prompts), prompt_2=None, prompt_3=None,
                                                  device=self.device(pipe), num_images_per_prompt=1,
                                                  do_classifier_free_guidance=False,
                                                  max_sequence_length=self.t5_tokens(pipe))
        return {"prompt_embeds": embeds, "pooled_prompt_embeds": pooled}

    def predict(self, pipe, noisy, timesteps, text, micro=None) -> torch.Tensor:
        return pipe.transformer(hidden_states=noisy, timestep=timesteps.to(noisy.device),
                                encoder_hidden_states=text["prompt_embeds"],
                                pooled_projections=text["pooled_prompt_embeds"]).sample

    def sample(self, pipe, prompts, n, steps, guidance_scale, generator) -> torch.Tensor:
        return call_pipeline(pipe, prompts, n, steps, guidance_scale, generator, self.resolution(pipe),
                             max_sequence_length=self.t5_tokens(pipe))
