"""A memory budget: whether the plan fits, by how much it does not, and which single changes (batch, max_length,
activation checkpointing, bf16 autocast, a 4-bit base) would make it fit, each with its predicted peak."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from tunesmith.config import RunConfig
from tunesmith.errors import ConfigError
from tunesmith.plan.memory import MemoryPlan, predict

UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
         "k": 2**10, "kib": 2**10, "m": 2**20, "mib": 2**20, "g": 2**30, "gib": 2**30, "t": 2**40, "tib": 2**40}


def parse_size(text: str) -> int:
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", text or "")
    if not match or match.group(2).lower() not in UNITS:
        raise ConfigError(f"--budget {text!r}: expected a size such as 8GiB, 16GB or 512MiB")
    return int(float(match.group(1)) * UNITS[match.group(2).lower()])


@dataclass
class Option:
    change: str
    peak: int
    fits: bool


@dataclass
class Advice:
    budget: int
    peak: int
    options: list[Option] = field(default_factory=list)

    @property
    def fits(self) -> bool:
        return self.peak <= self.budget

    @property
    def over_by(self) -> int:
        return max(0, self.peak - self.budget)


def _with(cfg: RunConfig, section: str, **changes) -> RunConfig:
    if section == "method":
        return RunConfig.model_validate({**cfg.model_dump(), "method": changes})
    return cfg.model_copy(update={section: getattr(cfg, section).model_copy(update=changes)})


def _candidates(cfg: RunConfig) -> list[tuple[str, RunConfig]]:
    out = []
    batch = cfg.train.batch_size
    while batch > 1:
        batch //= 2
        out.append((f"train.batch_size={batch} (train.grad_accum={cfg.train.grad_accum * cfg.train.batch_size // batch}"
                    " keeps the effective batch)", _with(cfg, "train", batch_size=batch,
                                                         grad_accum=cfg.train.grad_accum * cfg.train.batch_size // batch)))
    length = cfg.data.max_length
    while length > 128:
        length //= 2
        out.append((f"data.max_length={length}", _with(cfg, "data", max_length=length)))
    if not cfg.train.activation_checkpointing:
        out.append(("train.activation_checkpointing=true", _with(cfg, "train", activation_checkpointing=True)))
    if not cfg.train.bf16:
        out.append(("train.bf16=true", _with(cfg, "train", bf16=True)))
    four_bit = cfg.method.declaration.four_bit_variant
    if four_bit:
        settings = {**cfg.method.model_dump(), "name": four_bit}
        out.append((f"method.name={four_bit} (the base's linears in NF4)", _with(cfg, "method", **settings)))
    if cfg.method.declaration.parameters == "whole":  # the whole model's gradients and moments: train half of it
        from tunesmith.plan.architectures import resolve

        half = max(1, resolve(cfg.model.path).num_layers // 2)
        out.append((f"method.name=freeze method.last_layers={half} (the last {half} blocks train)",
                    _with(cfg, "method", name="freeze", last_layers=half)))
    return out


def add_options(advice: Advice, candidates, peak_of) -> None:
    """Each (change, changed config) planned with `peak_of`; of the smaller batches only down to the first that fits."""
    seen_fitting_batch = False
    for change, changed in candidates:
        peak = peak_of(changed)
        fits = peak <= advice.budget
        if change.startswith("train.batch_size"):
            if seen_fitting_batch:
                continue
            seen_fitting_batch = fits
        advice.options.append(Option(change, peak, fits))


def advise(cfg: RunConfig, memory: MemoryPlan, budget: int, device: str = "cpu") -> Advice:
    """The budget against the plan; when it does not fit, each single change that would, and (if none does) all of
    them together at batch 1."""
    arch_runtime = dict(device=device, runtime_bytes=memory.runtime.bytes)
    advice = Advice(budget, memory.peak)
    if advice.fits:
        return advice
    from tunesmith.plan.architectures import resolve

    arch = resolve(cfg.model.path)
    add_options(advice, _candidates(cfg), lambda changed: predict(changed, arch=arch, **arch_runtime).peak)
    if not any(o.fits for o in advice.options):
        everything = _with(cfg, "train", batch_size=1, activation_checkpointing=True, bf16=True)
        four_bit = cfg.method.declaration.four_bit_variant
        if four_bit:
            everything = _with(everything, "method", **{**cfg.method.model_dump(), "name": four_bit})
        peak = predict(everything, arch=arch, **arch_runtime).peak
        advice.options.append(Option("all of the above at batch 1", peak, peak <= budget))
    return advice
