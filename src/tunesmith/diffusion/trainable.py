"""What trains: the whole denoiser (UNet or transformer, and the text encoders if asked), or tunesmith's LoRA
(methods/lora.py) on their target modules (the family's defaults unless the config names them). The base weights
stay frozen and untouched under LoRA."""

from __future__ import annotations

import torch

from tunesmith.config.methods import LoraSettings
from tunesmith.methods import lora


def targets(family, component: str, method) -> list[str]:
    """The module-name suffixes LoRA wraps in one pipeline component."""
    if component == family.denoiser:
        return list(method.target_modules or family.denoiser_lora_targets)
    return list(method.text_target_modules or family.text_lora_targets)


def apply(family, pipe, method) -> dict[str, torch.nn.Module]:
    """Make the chosen parts trainable; returns the trained modules by their pipeline attribute name."""
    trained = {family.denoiser: family.denoiser_module(pipe)}
    if method.train_text_encoder:
        trained.update({name: getattr(pipe, name) for name in family.trainable_text_encoders
                        if getattr(pipe, name, None) is not None})
    for name, module in trained.items():
        if method.name == "lora":
            lora.apply(module, LoraSettings(r=method.r, alpha=method.alpha, dropout=method.dropout,
                                            target_modules=targets(family, name, method)))
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
