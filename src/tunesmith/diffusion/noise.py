"""How a training step noises clean latents and what the denoiser must predict, as the pipeline's scheduler says.

DDPM-style schedulers (SD 1.x/2.x, SDXL): integer timesteps t in [0, T); noisy = sqrt(ᾱ_t)·x + sqrt(1-ᾱ_t)·ε; the
target is ε (prediction_type epsilon) or the velocity sqrt(ᾱ_t)·ε - sqrt(1-ᾱ_t)·x (v_prediction);
SNR(t) = ᾱ_t / (1-ᾱ_t).

Flow matching (SD3, Flux: FlowMatchEulerDiscreteScheduler): a level σ drawn uniformly from the scheduler's training
sigmas, timestep = the scheduler's timestep at that level (σ·T after its shift); noisy = (1-σ)·x + σ·ε; the target
is the velocity ε - x; SNR = ((1-σ)/σ)².

Every draw comes from the caller's generator on the CPU, so a run gives the same numbers on every device."""

from __future__ import annotations

import torch

from tunesmith.errors import ModelError

TARGETS = ("epsilon", "v_prediction", "flow_matching")


def _broadcast(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return values.to(like.device, torch.float32).view(-1, *([1] * (like.dim() - 1)))


class Noising:
    """The training-time view of one scheduler (a copy: sampling's set_timesteps never changes it)."""

    def __init__(self, scheduler):
        import copy

        self.scheduler = copy.deepcopy(scheduler)
        config = self.scheduler.config
        self.flow = type(self.scheduler).__name__.startswith("FlowMatch")
        self.prediction_type = "flow_matching" if self.flow else config.get("prediction_type", "epsilon")
        if self.prediction_type not in TARGETS:
            raise ModelError(f"scheduler: prediction_type {self.prediction_type!r} is not supported for training; "
                             "expected 'epsilon' or 'v_prediction' (DDPM-style schedulers) or a flow-matching scheduler")
        self.num_train_timesteps = int(config.num_train_timesteps)
        if self.flow:
            self.timesteps = self.scheduler.timesteps.float()  # σ·T at the scheduler's training levels
        else:
            self.alphas_cumprod = self.scheduler.alphas_cumprod.float()

    def draw(self, n: int, generator: torch.Generator) -> torch.Tensor:
        """n training timesteps (CPU): integers for DDPM, the scheduler's float timesteps for flow matching."""
        index = torch.randint(0, self.num_train_timesteps, (n,), generator=generator)
        return self.timesteps[index] if self.flow else index

    def sigma(self, timesteps: torch.Tensor) -> torch.Tensor:
        """Flow matching's noise level of each timestep: σ = t / T."""
        return timesteps.cpu().float() / self.num_train_timesteps

    def add(self, clean: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        if self.flow:
            s = _broadcast(self.sigma(timesteps), clean)
            return ((1 - s) * clean.float() + s * noise.float()).to(clean.dtype)
        return self.scheduler.add_noise(clean, noise, timesteps.to(clean.device))

    def target(self, clean: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        if self.flow:
            return noise - clean
        if self.prediction_type == "epsilon":
            return noise
        return self.scheduler.get_velocity(clean, noise, timesteps.to(clean.device))

    def snr(self, timesteps: torch.Tensor) -> torch.Tensor:
        """Signal-to-noise ratio of each timestep (CPU, float32)."""
        if self.flow:
            s = self.sigma(timesteps).clamp_min(1e-6)
            return ((1 - s) / s) ** 2
        a = self.alphas_cumprod[timesteps.cpu().long()]
        return a / (1 - a)
