"""The one diffusion training loop (DreamBooth and text-to-image): each step takes a batch from the run's batch
source, noises it at random timesteps (noise.py), predicts through the pipeline's family (families/), and descends
the grouped, optionally min-SNR-weighted denoising loss (loss.py). Every random draw comes from one CPU generator
whose state the checkpoints keep (with the optimizer, the EMA and torch's RNG), so a resumed run ends with the
weights an uninterrupted one has."""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from tunesmith.diffusion import checkpoint
from tunesmith.diffusion.loss import grouped_loss, per_sample_mse
from tunesmith.diffusion.trainable import named_trainable, set_train_mode
from tunesmith.faults import fault_after
from tunesmith.runlog import ScalarLog


@dataclass
class Batch:
    prompts: list[str]
    clean: torch.Tensor                          # what the denoiser denoises, on its device
    groups: dict[str, tuple[int, int, float]]    # loss terms: name → (first row, end row, weight)
    micro: torch.Tensor | None = None            # SDXL's size conditioning, (N, 6)


@dataclass
class LoopSettings:
    steps: int
    lr: float
    weight_decay: float = 0.0
    max_grad_norm: float | None = 1.0
    save_every: int | None = None
    keep_checkpoints: int = 2
    precision: str = "auto"
    min_snr_gamma: float | None = None
    ema: object | None = None                    # ema.EMA over the trained parameters, or None


def autocast(device: torch.device, precision: str):
    bf16 = precision == "bf16" or (precision == "auto" and device.type == "cuda" and torch.cuda.is_bf16_supported())
    return torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else nullcontext()


class _Text:
    """The conditioning of the last prompt list, reused while no text encoder trains (DreamBooth's prompts repeat)."""

    def __init__(self, family, pipe, trains: bool):
        self.family, self.pipe, self.trains = family, pipe, trains
        self.prompts, self.value = None, None

    def __call__(self, prompts: list[str]) -> dict:
        if self.trains:
            return self.family.encode_text(self.pipe, prompts)
        if prompts != self.prompts:
            with torch.no_grad():
                self.prompts, self.value = list(prompts), self.family.encode_text(self.pipe, prompts)
        return self.value


def train(settings: LoopSettings, family, pipe, noising, trained: dict, next_batch: Callable[[torch.Generator], Batch],
          generator: torch.Generator, run_dir: Path, resume: bool = False, on_step=None) -> list[dict]:
    """Train `trained` (pipeline component name → module) in place; returns the metrics rows of this call.
    `generator` is seeded by the caller and is the only source of the batches' randomness."""
    device = family.device(pipe)
    params = named_trainable(trained)
    optimizer = torch.optim.AdamW(params.values(), lr=settings.lr, weight_decay=settings.weight_decay)
    start = 0
    if resume:
        saved = checkpoint.list_checkpoints(run_dir)
        if saved:
            start = checkpoint.load(saved[-1], params, optimizer, generator, settings.ema)
    text_of = _Text(family, pipe, trains=any(name in trained for name in family.text_encoders))
    rows = []
    scalars = ScalarLog(run_dir, start)
    set_train_mode(trained, True)
    try:
        for step in range(start, settings.steps):
            batch = next_batch(generator)
            clean = batch.clean
            noise = torch.randn(clean.shape, generator=generator).to(clean.device, clean.dtype)
            timesteps = noising.draw(len(clean), generator)
            noisy = noising.add(clean, noise, timesteps)
            with autocast(device, settings.precision):
                text = text_of(batch.prompts)
                prediction = family.predict(pipe, noisy, timesteps.to(device), text, batch.micro)
            per_sample = per_sample_mse(prediction, noising.target(clean, noise, timesteps))
            if settings.min_snr_gamma:
                from tunesmith.diffusion.snr import min_snr_weights

                per_sample = per_sample * min_snr_weights(noising.snr(timesteps), settings.min_snr_gamma,
                                                          noising.prediction_type).to(per_sample.device)
            total, terms = grouped_loss(per_sample, batch.groups)
            total.backward()
            if settings.max_grad_norm:
                torch.nn.utils.clip_grad_norm_(params.values(), settings.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if settings.ema is not None:
                settings.ema.update()
            row = {"step": step + 1, "loss": total.item(), **{f"{k}_loss": v.item() for k, v in terms.items()}}
            rows.append(row)
            scalars.write(row)
            if settings.save_every and (step + 1) % settings.save_every == 0 and step + 1 < settings.steps:
                checkpoint.save(run_dir, step + 1, params, optimizer, generator, settings.keep_checkpoints,
                                settings.ema)
            fault_after(step + 1)
            if on_step is not None:
                on_step(row)
    finally:
        scalars.close()
        set_train_mode(trained, False)
    return rows
