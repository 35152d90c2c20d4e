"""train.compile: torch.compile the decoder layers for the training step, and `auto`: only when the run is long
enough that the compile is repaid.

Measured (SmolLM2-135M, LoRA r=8 on q/k/v/o, packed batches of 8, 2 cores, AMD EPYC Zen 5, torch 2.13,
2026-12-07): under bf16 autocast the compiled step ran 1.2-1.35x the eager one (592-666 against ~800 ms); compiling
took 49 s with an empty inductor cache and 14 s with a warm one. In fp32 the compiled step ran 0.65x (1,604 against
1,044 ms: inductor's fp32 products are MKL's, the eager ones oneDNN's, kernels/onednn_linear.py), so `auto` never
compiles fp32.

Which layers: all but the first. The first layer's input is the embedding output, which does not require grad when
the embeddings are frozen, and dynamo guards on requires_grad: compiling it too compiled a second graph (cold 84 s
instead of 49). Shapes are dynamic from the start, since a packed batch has a new token count at almost every step
(static first, then a recompile, cost a second compile). Only the forward that records gradients is compiled:
evaluation, generation and a reference model run with grad off and stay eager, which would otherwise compile an
inference graph each.

The auto rule, decided once after `PROBE_STEPS` eager steps (the first of which pays one-off warm-up):

    compile  iff  tokens_left / eager_tokens_per_s x (1 - 1/speedup)  >=  MARGIN x compile_s

`speedup` and `compile_s` are the last ones measured on this machine for this layer signature (a record the loop
writes after every compiled run: `CompileRecords`), else `DEFAULT_SPEEDUP` and `DEFAULT_COMPILE_S` (the cold
measurement above, rounded up). `auto` is eager outside CPU bf16 autocast, under torchrun, and for objectives with
their own step (PPO, GRPO: their generation would recompile), and says why.
"""

from __future__ import annotations

import hashlib
import json
import platform
from dataclasses import dataclass
from pathlib import Path

import torch

from tunesmith.atomic import atomic_write_text
from tunesmith.context import RunContext
from tunesmith.errors import ConfigError
from tunesmith.kernels.patches import Patch

PROBE_STEPS = 3
DEFAULT_SPEEDUP = 1.25
DEFAULT_COMPILE_S = 60.0
MARGIN = 1.5


def decoder_layers(model) -> list | None:
    """The model's list of decoder layers (`layers`, GPT-2's `h`), or None."""
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    for name in ("layers", "h"):
        layers = getattr(decoder, name, None)
        if isinstance(layers, torch.nn.ModuleList) and len(layers):
            return list(layers)
    return None


def compiled_layers(model, ctx: RunContext) -> Patch:
    """Compile every decoder layer but the first for the forward that records gradients (module docstring); `ctx`
    records it (kernels/segment_attention.py cannot count a compiled layer's attention calls)."""
    layers = decoder_layers(model)
    if layers is None:
        raise ConfigError(f"train.compile: {type(model).__name__} has no list of decoder layers to compile; "
                          "set it to false")
    chosen = layers[1:] if len(layers) > 1 else layers
    for layer in chosen:
        compiled = torch.compile(layer._call_impl, dynamic=True)
        eager = layer._call_impl
        layer._compiled_call_impl = (lambda *a, _c=compiled, _e=eager, **k:
                                     _c(*a, **k) if torch.is_grad_enabled() else _e(*a, **k))
    ctx.compiled = True

    def undo() -> None:
        for layer in chosen:
            layer._compiled_call_impl = None  # what nn.Module.compile sets; torch has no public inverse
        ctx.compiled = False

    return Patch(len(chosen), undo)


def layer_signature(model, bf16: bool) -> str:
    """What a compiled layer's graph depends on: torch, the machine, the layer's class and config, which of its
    parameters train, the precision (which decides the frozen weights' dtype)."""
    layers = decoder_layers(model)
    layer = layers[1] if len(layers) > 1 else layers[0]
    params = sorted(f"{n}:{p.requires_grad}" for n, p in layer.named_parameters())
    config = model.config.to_json_string(use_diff=False) if hasattr(model.config, "to_json_string") else ""
    text = "|".join([torch.__version__, platform.machine(), platform.processor(), type(layer).__qualname__,
                     config, ",".join(params), "bf16" if bf16 else "fp32"])
    return hashlib.sha256(text.encode()).hexdigest()[:24]


class CompileRecords:
    """The compile seconds and step speed-up last measured per layer signature, in one JSON file."""

    def __init__(self, path: Path):
        self.path = Path(path)

    def read(self) -> dict:
        try:
            data = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    def get(self, signature: str) -> dict | None:
        found = self.read().get(signature)
        return found if isinstance(found, dict) else None

    def put(self, signature: str, compile_s: float, speedup: float) -> None:
        data = self.read()
        data[signature] = {"compile_s": round(compile_s, 2), "speedup": round(speedup, 4)}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.path, json.dumps(data, indent=1, sort_keys=True))


@dataclass
class Decision:
    compile: bool
    reason: str


def why_not(device_type: str, bf16: bool, world: int, own_loop: str | None) -> str | None:
    """Why `auto` stays eager for this run before any step is measured, or None if the measurement decides."""
    if device_type != "cpu":
        return f"auto compiles on CPU only (on {device_type} it is untested here); set train.compile: true to try"
    if not bf16:
        return "fp32 on CPU: the compiled step measured 0.65x the eager one (eager products run through oneDNN)"
    if world > 1:
        return "under torchrun auto stays eager; set train.compile: true to compile each rank"
    if own_loop is not None:
        return f"{own_loop}'s generation would recompile the layers"
    return None


def decide(eager_tokens_per_s: float, tokens_left: float, record: dict | None) -> Decision:
    """The auto rule (module docstring), with this run's measured eager speed."""
    speedup = record["speedup"] if record else DEFAULT_SPEEDUP
    compile_s = record["compile_s"] if record else DEFAULT_COMPILE_S
    source = "measured here before" if record else "default"
    saved = tokens_left / eager_tokens_per_s * (1 - 1 / speedup) if speedup > 1 else 0.0
    verdict = saved >= MARGIN * compile_s
    return Decision(verdict, f"{tokens_left:,.0f} tokens left at {eager_tokens_per_s:,.0f} tokens/s eager: compiling "
                             f"would save ~{saved:,.0f} s against ~{compile_s:,.0f} s of compiling ({source}: "
                             f"{speedup:.2f}x a step); {'on' if verdict else 'off'} (on from {MARGIN}x the compile)")
