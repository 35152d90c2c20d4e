"""Full fine-tuning: every parameter trains. The result is a whole model folder, not an adapter."""

from __future__ import annotations

from torch import nn

from tunesmith.atomic import atomic_folder
from tunesmith.config.methods import FullSettings
from tunesmith.errors import ModelError
from tunesmith.methods.base import quantized_layers, refuse_training_quantized

merge = unload = None  # the artifact is already a whole model (FullSettings.declaration)
disabled = None  # the base itself trains: no switch to the model before training
virtual_tokens = None  # no virtual tokens


def claims(config: dict) -> bool:
    return False


def apply(model: nn.Module, settings: FullSettings) -> None:
    refuse_training_quantized("full", quantized_layers(model))
    for p in model.parameters():
        p.requires_grad_(True)


def save(model: nn.Module, settings: FullSettings, folder, base_model: str) -> None:
    """save_pretrained (safetensors) plus the base's tokenizer, into a temp folder renamed into place."""
    from tunesmith.models import load_tokenizer

    with atomic_folder(folder) as tmp:
        use_cache = model.config.use_cache
        model.config.use_cache = True
        model.save_pretrained(tmp, safe_serialization=True)
        model.config.use_cache = use_cache
        load_tokenizer(base_model).save_pretrained(tmp)


def load(model: nn.Module, folder) -> FullSettings:
    raise ModelError(f"{folder}: a full fine-tune is a model folder; pass it as --model, not as an adapter")
