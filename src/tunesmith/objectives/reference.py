"""The reference policy of DPO and PPO (the model before training) without a second copy of the model.

Adapter methods leave the base weights untouched, so the reference is the same model with its adapters switched off:
each such method exports `disabled(model)`, a context manager (methods/__init__.py). That is cheaper and simpler than
anything the objective could do on its own: no copy, no cache, exact, and it works for samples the reference has
never seen (PPO's rollouts). Methods that train base weights in place (full, freeze, bitfit) have no such switch:
DPO then computes the reference log-probs of every pair once before training, caches them on the pairs and keeps
them in the run folder for `--resume` (objectives/reference_cache.py), and PPO, whose samples are new every step,
keeps the initial values of the trained parameters (only those) and swaps them in for its reference forwards.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch


def adapters_off(method):
    """The method's `disabled(model)` context manager, or None where the base itself trains."""
    return method.disabled


class InitialWeights:
    """A snapshot of the trainable parameters; `with snapshot(model):` runs the model with those values."""

    def __init__(self, model: torch.nn.Module):
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.saved = [p.detach().clone() for p in self.params]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.saved)

    @contextmanager
    def __call__(self, model: torch.nn.Module):
        current = [p.data for p in self.params]
        try:
            for p, initial in zip(self.params, self.saved):
                p.data = initial
            yield model
        finally:
            for p, now in zip(self.params, current):
                p.data = now
