"""An exponential moving average (EMA) of the trained parameters, for sampling and saving smoother weights.

After the n-th call of `update()` (n = 1, 2, …) every shadow s of a parameter p becomes
    s ← d_n·s + (1 - d_n)·p,
with d_n = `decay` without warmup, and with warmup (diffusers' EMAModel schedule, inv_gamma 1, power 1):
    d_1 = 0 (the first update copies the weights), d_n = min(decay, n / (n + 9)) for n ≥ 2, i.e. (1+k)/(10+k), k = n-1.
Shadows are float32 (a bf16 shadow could not move at decay 0.9999) on the parameter's device, created as copies of
the parameters; parameters are the trained ones, as a dict name → Parameter (LoRA's or a whole denoiser's).

`state_dict()` is tensors only, safetensors-ready: "updates" (int64, shape (1,)) and "shadow.<name>" for each
parameter; `load_state_dict` checks names and shapes. `copy_to()` writes the EMA into the parameters for good (the
end of a run); `swapped()` is a context in which the parameters hold the EMA weights, restored exactly afterwards (to
sample validation images with them mid-run)."""

from __future__ import annotations

from contextlib import contextmanager

import torch

from tunesmith.errors import ConfigError, ModelError


class EMA:
    def __init__(self, params: dict[str, torch.nn.Parameter], decay: float = 0.9999, warmup: bool = True):
        if not 0.0 <= decay < 1.0:
            raise ConfigError(f"ema decay {decay}; expected a number in [0, 1), e.g. 0.9999")
        self.params = params
        self.decay = decay
        self.warmup = warmup
        self.updates = 0
        self.shadow = {name: p.detach().to(torch.float32, copy=True) for name, p in params.items()}

    def current_decay(self) -> float:
        """The decay the next update uses."""
        n = self.updates + 1
        if not self.warmup:
            return self.decay
        return 0.0 if n == 1 else min(self.decay, n / (n + 9))

    @torch.no_grad()
    def update(self) -> None:
        weight = 1.0 - self.current_decay()
        for name, p in self.params.items():
            self.shadow[name].lerp_(p.detach().to(torch.float32), weight)
        self.updates += 1

    @torch.no_grad()
    def copy_to(self) -> None:
        for name, p in self.params.items():
            p.copy_(self.shadow[name])

    @contextmanager
    def swapped(self):
        """Within: the parameters hold the EMA weights; after: their own again, bit for bit."""
        kept = {name: p.detach().clone() for name, p in self.params.items()}
        self.copy_to()
        try:
            yield
        finally:
            with torch.no_grad():
                for name, p in self.params.items():
                    p.copy_(kept[name])

    def state_dict(self) -> dict[str, torch.Tensor]:
        out = {"updates": torch.tensor([self.updates], dtype=torch.int64)}
        out.update({f"shadow.{name}": t for name, t in self.shadow.items()})
        return out

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        expected = {f"shadow.{name}" for name in self.params} | {"updates"}
        missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
        if missing or unexpected:
            raise ModelError(f"EMA state: missing {missing[:3]}, unexpected {unexpected[:3]}; expected the EMA of the "
                             "same trained parameters (the checkpoint was made by a different setup)")
        for name, s in self.shadow.items():
            t = state[f"shadow.{name}"]
            if t.shape != s.shape:
                raise ModelError(f"EMA state: shadow.{name} has shape {tuple(t.shape)}; expected {tuple(s.shape)}")
            s.copy_(t)
        self.updates = int(state["updates"].item())
