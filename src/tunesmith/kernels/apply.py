"""Speed and memory options of `train:` that change how the model computes, never what it computes."""

from __future__ import annotations

from tunesmith.errors import ConfigError
from tunesmith.kernels import fused_norm, onednn_linear, segment_attention
from tunesmith.kernels.allocator import keep_freed_memory


def apply_speed_options(model, train_settings) -> None:
    """Freed memory kept for the next step (kernels/allocator.py), segment attention for packed batches (where the
    model allows it), fused RMSNorm, linear products through oneDNN on CPU, chunked cross-entropy (read by
    objectives/lm.py), activation checkpointing, per-layer torch.compile."""
    keep_freed_memory()
    segment_attention.enable(model)
    fused_norm.enable(model)
    if train_settings.onednn_linear:
        onednn_linear.enable(model)
    model.tunesmith_loss_chunk = train_settings.loss_chunk
    if train_settings.activation_checkpointing:
        if not getattr(model, "supports_gradient_checkpointing", False):
            raise ConfigError(f"train.activation_checkpointing: {type(model).__name__} does not support activation "
                              "checkpointing; set it to false")
        enable = getattr(model, "activation_checkpointing_enable", None)
        if enable is not None:  # transformers ≥ 5.x's name; the older one warns there
            enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if train_settings.compile:
        layers = getattr(model.get_decoder(), "layers", None)
        if layers is None:
            raise ConfigError(f"train.compile: {type(model).__name__} has no list of decoder layers to compile; "
                              "set it to false")
        for layer in layers:
            layer.compile()
