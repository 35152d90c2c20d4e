"""What trains: the whole UNet (and text encoder), or tunesmith's LoRA (methods/lora.py) on their attention
projections. The base weights stay frozen and untouched under LoRA."""

from __future__ import annotations

import torch

from tunesmith.config.methods import LoraSettings
from tunesmith.diffusion.config import TEXT_ATTENTION, MethodSettings
from tunesmith.methods import lora


def lora_settings(method: MethodSettings, targets: list[str]) -> LoraSettings:
    return LoraSettings(r=method.r, alpha=method.alpha, dropout=method.dropout, target_modules=targets)


def apply(pipe, method: MethodSettings) -> dict[str, torch.nn.Module]:
    """Make the chosen parts trainable; returns the trained modules by their pipeline name."""
    trained = {"unet": pipe.unet}
    if method.train_text_encoder:
        trained["text_encoder"] = pipe.text_encoder
    for name, module in trained.items():
        if method.name == "lora":
            lora.apply(module, lora_settings(method, method.target_modules if name == "unet" else TEXT_ATTENTION))
            for layer in lora.lora_layers(module).values():  # adapters train in fp32 whatever the base's dtype
                layer.lora_A.float()
                layer.lora_B.float()
        else:
            module.requires_grad_(True)
    return trained


def named_trainable(trained: dict[str, torch.nn.Module]) -> dict[str, torch.nn.Parameter]:
    return {f"{name}.{n}": p for name, module in trained.items() for n, p in module.named_parameters() if p.requires_grad}


def set_train_mode(trained: dict[str, torch.nn.Module], on: bool) -> None:
    for module in trained.values():
        module.train(on)
