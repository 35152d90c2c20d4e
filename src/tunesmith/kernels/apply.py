"""Speed and memory options of `train:` that change how the model computes, never what it computes."""

from __future__ import annotations

from collections.abc import Callable

from tunesmith.context import RunContext
from tunesmith.errors import ConfigError
from tunesmith.kernels import compile_policy, frozen_bf16, fused_norm, onednn_linear, segment_attention
from tunesmith.kernels.patches import Patch


def _chunked_loss(chunk: int) -> Callable:
    def patch(model, ctx: RunContext) -> Patch:
        ctx.loss_chunk = chunk  # read by objectives/lm.py
        return Patch(1, lambda: setattr(ctx, "loss_chunk", None))

    return patch


def _model_only(enable: Callable) -> Callable:
    return lambda model, ctx: enable(model)


def _onednn(model, ctx: RunContext) -> Patch:
    ctx.onednn = onednn_linear.available()  # the chunked cross-entropy's products take the same path
    patch = onednn_linear.enable(model)
    return Patch(patch.changed, lambda: (patch.unpatch(), setattr(ctx, "onednn", False)), reason=patch.reason)


def _activation_checkpointing(model) -> Patch:
    if not getattr(model, "supports_gradient_checkpointing", False):
        raise ConfigError(f"train.activation_checkpointing: {type(model).__name__} does not support activation "
                          "checkpointing; set it to false")
    enable = getattr(model, "activation_checkpointing_enable", None)
    if enable is not None:  # transformers ≥ 5.x's name; the older one warns there
        enable(activation_checkpointing_kwargs={"use_reentrant": False})
        return Patch(1, model.activation_checkpointing_disable)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return Patch(1, model.gradient_checkpointing_disable)


def speed_patches(train_settings, base_is_trained: bool = False) -> list[tuple[str, Callable]]:
    """(the train.* setting that turns it off, the function `patch(model, ctx)` that patches a model, records what
    it switched on in the run context and returns a `Patch` (kernels/patches.py): what it changed, and how to undo
    it) for each patch of the model's
    computation that `train_settings` switches on, in the order they apply.
    Each rests on transformers' or torch's internals; train/self_check.py compares the patched model's logits with
    the plain model's, patch by patch. `base_is_trained`: the method trains and saves base weights (full, freeze,
    bitfit), whose frozen layers then keep their dtype."""
    patches = []
    if train_settings.bf16 and train_settings.bf16_frozen_weights and not base_is_trained:
        patches.append(("train.bf16_frozen_weights", _model_only(frozen_bf16.enable)))
    if train_settings.segment_attention:
        patches.append(("train.segment_attention", _model_only(segment_attention.enable)))
    if train_settings.fused_norm:
        patches.append(("train.fused_norm", _model_only(fused_norm.enable)))
    if train_settings.onednn_linear:
        patches.append(("train.onednn_linear", _onednn))
    if train_settings.loss_chunk:
        patches.append(("train.loss_chunk", _chunked_loss(train_settings.loss_chunk)))
    return patches


def apply_speed_options(model, train_settings, ctx: RunContext, after_each: Callable[[str], None] | None = None,
                        base_is_trained: bool = False) -> RunContext:
    """Segment attention for packed batches (where the model allows it), fused RMSNorm, linear products through
    oneDNN on CPU, chunked cross-entropy (read by objectives/lm.py through `ctx`), activation checkpointing,
    per-layer torch.compile; under bf16 autocast, frozen linear weights stored in bf16. What the model itself cannot
    show (the loss chunk, oneDNN for the loss, compiled layers) is recorded in `ctx`, which is returned, with each
    applied patch (`ctx.patches`: (setting, Patch), undone by `unpatch(ctx)`; one the model cannot take changed
    nothing and says why: `switched_off`). `after_each(setting)` is called after each of `speed_patches` that changed
    the model, with the train.* setting that turns it off."""
    ctx.loss_chunk = None
    for setting, patch in speed_patches(train_settings, base_is_trained):
        applied = patch(model, ctx)
        ctx.patches.append((setting, applied))  # changing no module, it may still have set `ctx`
        if applied and after_each is not None:
            after_each(setting)
    if train_settings.activation_checkpointing:
        ctx.patches.append(("train.activation_checkpointing", _activation_checkpointing(model)))
    if train_settings.compile is True:  # `auto` is decided by the loop after measured steps (train/compile_schedule.py)
        ctx.patches.append(("train.compile", compile_policy.compiled_layers(model, ctx)))
    return ctx


def switched_off(ctx: RunContext) -> list[tuple[str, str]]:
    """(setting, why) for each speed patch the run asked for that the model cannot take, decided from its config
    and modules (kernels/segment_attention.py `unsupported`, fused_norm.py, onednn_linear.py, frozen_bf16.py)."""
    return [(setting, patch.reason) for setting, patch in ctx.patches if not patch and patch.reason]


def unpatch(ctx: RunContext) -> list[str]:
    """Undo every patch recorded in `ctx`, the last applied first; returns their settings in that order."""
    undone = []
    while ctx.patches:
        setting, patch = ctx.patches.pop()
        patch.unpatch()
        undone.append(setting)
    return undone
