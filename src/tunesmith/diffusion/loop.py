"""The DreamBooth training loop: each step draws `batch_size` instance images and as many class images, noises them
at random timesteps, and descends the DreamBooth loss. Every random draw comes from one generator whose state the
checkpoints keep, so a resumed run ends with the weights an uninterrupted one has."""

from __future__ import annotations

import json
from contextlib import nullcontext
from pathlib import Path

import torch

from tunesmith.diffusion import checkpoint
from tunesmith.diffusion.config import DreamBoothConfig
from tunesmith.diffusion.loss import dreambooth_loss, target
from tunesmith.diffusion.trainable import named_trainable, set_train_mode
from tunesmith.faults import fault_after

METRICS = "metrics.jsonl"


def autocast(device: torch.device, precision: str):
    bf16 = precision == "bf16" or (precision == "auto" and device.type == "cuda" and torch.cuda.is_bf16_supported())
    return torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else nullcontext()


def _keep_metrics_until(run_dir: Path, step: int) -> None:
    path = run_dir / METRICS
    if path.is_file():
        rows = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= step]
        path.write_text("".join(r + "\n" for r in rows))


def train(cfg: DreamBoothConfig, pipe, scheduler, trained: dict, instance: torch.Tensor,
          class_images: torch.Tensor | None, run_dir: Path, resume: bool = False, on_step=None) -> list[dict]:
    """Train in place; returns the metrics rows of this call. `instance`/`class_images`: (N, C, H, W) in [0, 1]."""
    device = pipe.unet.device
    generator = torch.Generator().manual_seed(cfg.seed)
    params = named_trainable(trained)
    optimizer = torch.optim.AdamW(params.values(), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    start = 0
    if resume:
        saved = checkpoint.list_checkpoints(run_dir)
        if saved:
            start = checkpoint.load(saved[-1], params, optimizer, generator)
            _keep_metrics_until(run_dir, start)
    weight = cfg.prior.weight if class_images is not None else 0.0
    bs = cfg.train.batch_size
    prompts = [cfg.instance.prompt] * bs + ([cfg.prior.class_prompt] * bs if weight > 0 else [])
    ids = pipe.tokenize(prompts).to(device)
    text_trains = "text_encoder" in trained
    if not text_trains:
        with torch.no_grad():
            frozen_text = pipe.text_encoder(ids)[0]
    steps = cfg.train.steps
    rows = []
    set_train_mode(trained, True)
    try:
        for step in range(start, steps):
            pick = torch.randint(len(instance), (bs,), generator=generator)
            pixels = instance[pick]
            if weight > 0:
                pixels = torch.cat([pixels, class_images[torch.randint(len(class_images), (bs,), generator=generator)]])
            pixels = (pixels * 2 - 1).to(device)
            with torch.no_grad():
                if pipe.vae is None:
                    clean = pixels
                else:
                    clean = pipe.vae.encode(pixels).latent_dist.sample(generator=generator) * pipe.vae.config.scaling_factor
            noise = torch.randn(clean.shape, generator=generator).to(device)
            timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (len(clean),), generator=generator).to(device)
            noisy = scheduler.add_noise(clean, noise, timesteps)
            with autocast(device, cfg.train.precision):
                text = pipe.text_encoder(ids)[0] if text_trains else frozen_text
                prediction = pipe.unet(noisy, timesteps, encoder_hidden_states=text).sample
            goal = target(scheduler, clean, noise, timesteps)
            total, inst_term, prior_term = dreambooth_loss(prediction, goal, bs, weight)
            total.backward()
            if cfg.train.max_grad_norm:
                torch.nn.utils.clip_grad_norm_(params.values(), cfg.train.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            row = {"step": step + 1, "loss": total.item(), "instance_loss": inst_term.item(),
                   "prior_loss": prior_term.item()}
            rows.append(row)
            with open(run_dir / METRICS, "a", encoding="utf-8") as fh:
                fh.write(json.dumps(row) + "\n")
            if cfg.train.save_every and (step + 1) % cfg.train.save_every == 0 and step + 1 < steps:
                checkpoint.save(run_dir, step + 1, params, optimizer, generator, cfg.train.keep_checkpoints)
            fault_after(step + 1)
            if on_step is not None:
                on_step(row)
    finally:
        set_train_mode(trained, False)
    return rows
