"""What a method is: a module satisfying `Method`, registered by one line in methods/__init__.py.

What the rest of the system needs to know about a method without running it (its artifact's name, whether and why
not it merges, its memory terms for the planner, ...) it declares as plain data on its settings class
(config/methods.py: `Settings.declaration`, a `MethodDeclaration`), so config validation and the planner read it
without importing torch. tests/test_conformance.py checks every registered method against both.
"""

from __future__ import annotations

from typing import Callable, ContextManager, Protocol

from tunesmith.config.declarations import MemoryTerms, MethodDeclaration, Saved

__all__ = ["MemoryTerms", "Method", "MethodDeclaration", "Saved"]


class Method(Protocol):
    def apply(self, model, settings) -> None:
        """Freeze the base and add the method's trainable parameters."""

    def save(self, model, settings, folder, base_model: str) -> None:
        """adapter_config.json + adapter_model.safetensors (PEFT's format where PEFT has the method), or the whole
        model folder where the declaration's artifact is the model."""

    def load(self, model, folder):
        """The inverse of save, shapes checked against the base; returns the settings read back."""

    def claims(self, adapter_config: dict) -> bool:
        """Whether a saved adapter folder (its adapter_config.json) is this method's."""

    # Fold the trained parameters into the base's weights / remove the method's layers afterwards; None where the
    # declaration says it cannot merge (`not_mergeable`).
    merge: Callable[..., None] | None
    unload: Callable[..., object] | None
    # A context manager running the bare base model inside it (adapters off, no copy); None where the base weights
    # themselves train (full, freeze, bitfit), which have no such switch.
    disabled: Callable[..., ContextManager] | None
    # The module that runs the decoder with the method's virtual tokens (prompt, prefix), which a run context carries
    # (context.py); None for methods without virtual tokens.
    virtual_tokens: Callable[..., object] | None
