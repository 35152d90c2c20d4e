"""LoRA+ (Hayou, Ghosh and Yu, 2024): B learns `ratio` times faster than A, through optimizer parameter groups.

The groups are those of PEFT's `create_loraplus_optimizer`: A (every trained matrix that is not a B) at lr; B, with
every other 1-D trained parameter, at lr × ratio; and those of them PEFT keeps from weight decay (names holding
"bias", parameters of LayerNorm modules) in a group of their own at lr × ratio without weight decay. PEFT's fourth
group, LoRA on embedding layers, has no members here: tunesmith's LoRA wraps linear layers only.
"""

from __future__ import annotations

from torch import nn


def _decays(model: nn.Module) -> set[str]:
    """Names of the parameters PEFT's LoRA+ applies weight decay to: not a bias, not inside a LayerNorm."""
    kept = set()
    for module_name, module in model.named_modules():
        if isinstance(module, nn.LayerNorm):
            continue
        for name, _ in module.named_parameters(prefix=module_name, recurse=False):
            if "bias" not in name:
                kept.add(name)
    return kept


def loraplus_groups(model: nn.Module, lr: float, weight_decay: float, ratio: float) -> list[dict]:
    """The trained parameters of `model` in LoRA+'s groups (A; B; B without weight decay), empty groups left out."""
    decays = _decays(model)
    a, b, b_no_decay = [], [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if "lora_B" in name or p.ndim == 1:
            (b if name in decays else b_no_decay).append(p)
        else:
            a.append(p)
    groups = [{"params": a, "lr": lr, "weight_decay": weight_decay},
              {"params": b, "lr": lr * ratio, "weight_decay": weight_decay},
              {"params": b_no_decay, "lr": lr * ratio, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]
