"""What the denoiser denoises, from images: a VAE's posterior per image, computed once and drawn from at every step
(a draw from the cached mean and std is the same as encoding again: mean + std·ε), scaled and shifted as diffusers'
pipelines expect: (z - shift_factor) · scaling_factor. In pixel space the images themselves."""

from __future__ import annotations

import torch


@torch.no_grad()
def posterior(vae, pixels: torch.Tensor, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, std) of the VAE's latent distribution for pixels in [-1, 1], on the VAE's device, `batch_size`
    images at a time."""
    means, stds = [], []
    for start in range(0, len(pixels), batch_size):
        dist = vae.encode(pixels[start:start + batch_size].to(vae.device, vae.dtype)).latent_dist
        means.append(dist.mean)
        stds.append(dist.std)
    return torch.cat(means), torch.cat(stds)


def draw(vae, mean: torch.Tensor, std: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """One posterior sample per image; ε from the CPU generator, so the same on every device."""
    eps = torch.randn(mean.shape, generator=generator).to(mean.device, mean.dtype)
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    return (mean + std * eps - shift) * vae.config.scaling_factor


class LatentCache:
    """Every image's posterior (or its pixels, without a VAE) computed once; `draw(rows, generator)` returns the
    denoiser's clean inputs for those rows."""

    def __init__(self, vae, pixels: torch.Tensor, device, batch_size: int):
        self.vae = vae
        if vae is None:
            self.pixels = pixels.to(device)
        else:
            self.mean, self.std = posterior(vae, pixels, batch_size)

    def __len__(self) -> int:
        return len(self.pixels if self.vae is None else self.mean)

    def draw(self, rows: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        if self.vae is None:
            return self.pixels[rows.to(self.pixels.device)]
        rows = rows.to(self.mean.device)
        return draw(self.vae, self.mean[rows], self.std[rows], generator)
