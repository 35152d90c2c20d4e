"""What a kernel may patch, and patches that can be undone.

`is_plain_linear(module)`: nn.Linear itself, or one of this project's stand-ins that compute the same x·Wᵀ + b and
differ only in where or in what storage (OneDNNLinear, FrozenBf16Linear: they derive from `PlainLinear`). Kernels,
methods and objectives that treat a layer as a bare linear map ask this, not a list of exact types, which a new
stand-in would silently fall out of (the slow path commit 00f9ebc fixed). Subclasses from elsewhere (LoRA's layers,
quantized linears) are not plain: their forward does more.

A wrapper class that reads its base layer's weight itself (DoRA: its weight norm, from the fp32 weight) declares
`reads_base_weight = True`; `base_weight_readers(model)` finds the layers whose weight must keep its storage.

Each patch of kernels/apply.py returns a `Patch`: how many modules it changed, and `unpatch()`, which puts back what
it changed (classes, attention implementation, compiled layers). The run context keeps them in order (context.py).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable

from torch import nn


class PlainLinear(nn.Linear):
    """Base of the stand-ins for nn.Linear whose forward computes what nn.Linear's does."""


def is_plain_linear(module: nn.Module) -> bool:
    return type(module) is nn.Linear or isinstance(module, PlainLinear)


@functools.cache
def conv1d_class() -> type | None:
    """transformers' Conv1D (GPT-2's linear layers: x·W + b with W stored (in, out)), or None without it."""
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:
        return None
    return Conv1D


def is_conv1d(module: nn.Module) -> bool:
    """Exactly transformers' Conv1D (a stand-in for it is a subclass)."""
    return conv1d_class() is not None and type(module) is conv1d_class()


def base_weight_readers(model: nn.Module) -> set[int]:
    """ids of the layers wrapped (as `base_layer`) by a module whose class declares `reads_base_weight`."""
    return {id(m.base_layer) for m in model.modules()
            if getattr(type(m), "reads_base_weight", False) and hasattr(m, "base_layer")}


class Patch:
    """A change to a model: `changed` modules; `unpatch()` undoes it (once; later calls do nothing). A patch that
    changed nothing says why in `reason` (the model has nothing it applies to), for the run's log."""

    def __init__(self, changed: int, undo: Callable[[], None] | None = None, reason: str = ""):
        self.changed = changed
        self._undo = undo
        self.reason = reason

    def __bool__(self) -> bool:
        return self.changed > 0

    def unpatch(self) -> None:
        undo, self._undo = self._undo, None
        if undo is not None:
            undo()


def swap_classes(pairs: Iterable[tuple[nn.Module, type]], also_undo: Callable[[nn.Module], None] | None = None
                 ) -> Patch:
    """Give each module its new class; unpatching gives each its old class back (then `also_undo(module)`)."""
    originals = []
    for module, new_class in pairs:
        originals.append((module, type(module)))
        module.__class__ = new_class

    def undo() -> None:
        for module, old_class in originals:
            module.__class__ = old_class
            if also_undo is not None:
                also_undo(module)

    return Patch(len(originals), undo)
