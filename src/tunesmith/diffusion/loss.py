"""The DreamBooth loss: the denoising loss on the instance images plus `weight` × the same loss on the class images
the base model generated (prior preservation). The target is the noise (epsilon) or the velocity (v-prediction), as the
scheduler's config says."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tunesmith.errors import ModelError


def target(scheduler, clean: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return scheduler.get_velocity(clean, noise, timesteps)
    raise ModelError(f"scheduler: prediction_type {kind!r} is not supported for training; expected 'epsilon' or "
                     "'v_prediction'")


def dreambooth_loss(prediction: torch.Tensor, goal: torch.Tensor, n_instance: int, weight: float):
    """(total, instance term, prior term): rows [:n_instance] are instance images, the rest class images.
    total = instance + weight · prior, each term a mean squared error over its own rows."""
    prediction, goal = prediction.float(), goal.float()
    instance = F.mse_loss(prediction[:n_instance], goal[:n_instance])
    if n_instance == prediction.shape[0] or weight == 0:
        prior = torch.zeros((), device=prediction.device)
        return instance, instance, prior
    prior = F.mse_loss(prediction[n_instance:], goal[n_instance:])
    return instance + weight * prior, instance, prior
