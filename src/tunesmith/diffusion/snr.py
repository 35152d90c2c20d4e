"""Min-SNR-γ loss weighting (Hang et al. 2023, "Efficient Diffusion Training via Min-SNR Weighting Strategy").

The paper's rule: weigh each sample so that its loss, written as a loss on the clean image x0, has weight
min(SNR(t), γ) (γ = 5 in the paper). Each training target already carries an implicit x0 weight, which the
returned per-sample weight divides out (SNR from noise.Noising.snr; multiply each sample's mean squared error by it):

- epsilon:        ‖ε̂ - ε‖² = SNR·‖x̂0 - x0‖²          → weight min(SNR, γ) / SNR
- v_prediction:   ‖v̂ - v‖² = (SNR + 1)·‖x̂0 - x0‖²    → weight min(SNR, γ) / (SNR + 1)
- sample (x0):    ‖x̂0 - x0‖²                           → weight min(SNR, γ)
- flow_matching:  x_t = (1-σ)·x0 + σ·ε, target ε - x0, SNR = ((1-σ)/σ)², so σ = 1 / (1 + √SNR) and
                  ‖v̂ - v‖² = ‖x̂0 - x0‖² / σ² = (1 + √SNR)²·‖x̂0 - x0‖²  → weight min(SNR, γ) / (1 + √SNR)²
  This is the paper's rule carried over unchanged: every parametrisation ends with the same x0 weight min(SNR, γ).
  (SD3's and Flux's own recipes weigh flow matching by timestep density instead; this is the same principle as for
  DDPM, offered so that the option means one thing on every pipeline.)

At SNR = 0 (pure noise) the epsilon weight is taken as 1 (its limit) rather than 0/0."""

from __future__ import annotations

import torch

from tunesmith.errors import ConfigError

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample", "flow_matching")


def min_snr_weights(snr: torch.Tensor, gamma: float, prediction_type: str) -> torch.Tensor:
    """Per-sample loss weights, float32, shaped like `snr`."""
    if not gamma > 0:
        raise ConfigError(f"min-SNR gamma {gamma}; expected a positive number (the paper uses 5)")
    snr = snr.to(torch.float32)
    clipped = snr.clamp(max=gamma)
    if prediction_type == "epsilon":
        return torch.where(snr > 0, clipped / snr, torch.ones_like(snr))
    if prediction_type == "v_prediction":
        return clipped / (snr + 1)
    if prediction_type == "sample":
        return clipped
    if prediction_type == "flow_matching":
        return clipped / (1 + snr.sqrt()) ** 2
    raise ConfigError(f"min-SNR: prediction type {prediction_type!r}; expected one of {', '.join(PREDICTION_TYPES)}")
