"""fp32 nn.Linear products through oneDNN on CPU: the forward x·Wᵀ + b, the input gradient g·W and, for a weight
that trains, the weight gradient gᵀ·x.

PyTorch runs fp32 matrix products on CPU through MKL's sgemm. oneDNN's inner-product kernels, which PyTorch also
ships (and uses itself only for bf16 and inside torch.compile), ran the shapes of this project's fine-tunes faster on
its CPU machines, with results equal up to the order of the sums (relative 1e-6): on an earlier AMD EPYC box 15–35 %
(T tokens × 512–1536 features: 183–196 against 134–174 GFLOP/s), on AMD EPYC Zen 5 2.2× for the forward and input
gradient (415–464 against 199–209) and 1.8× for the weight gradient (358–368 against 186–204). oneDNN reads the
transposed operands as strided views, so nothing is copied. bf16 autocast, CUDA and torch.compile keep PyTorch's
own path. Generation takes the same path (one token's products measured as fast or faster: 42 against 69 µs for
576 → 1536), and so does a reference model with its adapters switched off, which therefore computes exactly what the
policy computed before its first step (DPO's reference, objectives/dpo.py).

`enable(model)` (train.onednn_linear) gives the fp32 nn.Linear layers of a model, and transformers' Conv1D layers
(GPT-2: the same product with the weight stored transposed, handed over as a view), a forward that takes this path
when it applies; the output embedding is left alone, since the chunked cross-entropy runs its products itself
(objectives/chunked_ce.py), told by the run context (context.py).
"""

from __future__ import annotations

import contextlib
import functools
import os

import torch
from torch import nn

from tunesmith.kernels.patches import Patch, PlainLinear, conv1d_class, is_conv1d, is_plain_linear, swap_classes

# oneDNN keeps every primitive it builds, one per product shape, in two caches of 1,024 entries each by default; a
# packed batch has a new token count at almost every step, so a long run grew by ~8 MiB per new count (measured:
# 3.4 GiB after 400). 64 entries hold a step's dozen shapes several times over. oneDNN reads these variables once,
# when it first runs; a user's own value wins.
CACHE_CAPACITIES = {"ONEDNN_PRIMITIVE_CACHE_CAPACITY": "64", "LRU_CACHE_CAPACITY": "64"}


@contextlib.contextmanager
def _cache_capacities():
    """The cache capacities in os.environ for the duration, the environment as it was afterwards."""
    added = [name for name in CACHE_CAPACITIES if name not in os.environ]
    os.environ.update({name: CACHE_CAPACITIES[name] for name in added})
    try:
        yield
    finally:
        for name in added:
            os.environ.pop(name, None)


@functools.cache
def _op():
    try:
        op = torch.ops.mkldnn._linear_pointwise
        if not torch.backends.mkldnn.is_available():
            return None
        x, w = torch.ones(2, 3), torch.ones(4, 3)
        with _cache_capacities():  # oneDNN's first product in the process reads them
            probe = op(x, w, None, "none", [], "")
        if not torch.equal(probe, x @ w.T):
            return None
        return op
    except (AttributeError, RuntimeError):
        return None


def bound_caches() -> None:
    """Bound oneDNN's caches for the rest of the process, if oneDNN has not run in it yet (it reads its capacities
    once); os.environ is left as it was. Run at a run's start: bf16 products also go through oneDNN."""
    _op()


def available() -> bool:
    """Whether this process's torch has oneDNN's linear op and it computes a product correctly."""
    return _op() is not None


def applies(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether the oneDNN path computes this product: fp32 CPU tensors, no autocast, oneDNN present, and not
    inside torch.compile (inductor lowers this op only for weights it holds as constants; it picks its own kernels)."""
    return (x.device.type == "cpu" and x.dtype == torch.float32 and weight.dtype == torch.float32
            and not torch.is_autocast_enabled("cpu") and not torch.compiler.is_compiling() and _op() is not None)


def product(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x·Wᵀ + b for x (..., in), weight (out, in); call only where `applies` holds."""
    flat = x.reshape(-1, x.shape[-1])
    return _op()(flat, weight, bias, "none", [], "").view(*x.shape[:-1], weight.shape[0])


def input_grad(grad: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """grad·W for grad (tokens, out), weight (out, in): the gradient of x·Wᵀ with respect to x."""
    return _op()(grad, weight.t(), None, "none", [], "")


def weight_grad(grad: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """gradᵀ·x for grad (tokens, out), x (tokens, in): the gradient of x·Wᵀ with respect to W."""
    return _op()(grad.t(), x.t(), None, "none", [], "")


class _LinearFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias):
        flat = x.reshape(-1, x.shape[-1])
        ctx.save_for_backward(weight, flat if weight.requires_grad else None)
        ctx.input_shape = x.shape
        return product(x, weight, bias)

    @staticmethod
    def backward(ctx, grad_out):
        weight, flat = ctx.saved_tensors
        grad = grad_out.reshape(-1, grad_out.shape[-1])
        needs = ctx.needs_input_grad
        grad_x = input_grad(grad, weight).view(ctx.input_shape) if needs[0] else None
        grad_weight = weight_grad(grad, flat) if needs[1] else None
        grad_bias = grad.sum(0) if needs[2] else None
        return grad_x, grad_weight, grad_bias


def _linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x·Wᵀ + b through oneDNN, differentiable where grad is on; call only where `applies` holds."""
    if not torch.is_grad_enabled():
        return product(x, weight, bias)
    return _LinearFunction.apply(x, weight, bias)


class OneDNNLinear(PlainLinear):
    """An nn.Linear whose products run through oneDNN where `applies` holds."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not applies(x, self.weight):
            return super().forward(x)
        return _linear(x, self.weight, self.bias)


def _conv1d_forward(self, x: torch.Tensor) -> torch.Tensor:
    weight = self.weight.t()  # Conv1D keeps W as (in, out); its gradient flows back through the view
    if not applies(x, weight):
        return self.plain_forward(x)
    return _linear(x, weight, self.bias)


@functools.cache
def _onednn_conv1d() -> type:
    """A subclass of transformers' Conv1D whose products run through oneDNN where `applies` holds."""
    conv1d = conv1d_class()
    return type("OneDNNConv1D", (conv1d,), {"forward": _conv1d_forward, "plain_forward": conv1d.forward,
                                            "__module__": __name__})


def enable(model: nn.Module) -> Patch:
    """Give the fp32 CPU linear layers of `model` the oneDNN path (its chunked cross-entropy takes it where the run
    context says so: kernels/apply.py); the patch says how many layers it changed."""
    if _op() is None:
        return Patch(0, reason="this torch has no working oneDNN linear op")
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    fp32_cpu = [m for m in model.modules() if m is not head and isinstance(getattr(m, "weight", None), torch.Tensor)
                and m.weight.dtype == torch.float32 and m.weight.device.type == "cpu"]
    patch = swap_classes([(m, OneDNNLinear) for m in fp32_cpu
                          if is_plain_linear(m) and not isinstance(m, OneDNNLinear)]
                         + [(m, _onednn_conv1d()) for m in fp32_cpu if is_conv1d(m)])
    if not patch:
        patch.reason = (f"no fp32 CPU nn.Linear or Conv1D besides the output layer (its layers: "
                        f"{matrix_layers(model, head)})")
    return patch


def matrix_layers(model: nn.Module, head: nn.Module | None = None) -> str:
    """The class names of the layers of `model` that hold a weight matrix, the embeddings and `head` aside."""
    names = {type(m).__name__ for m in model.modules() if m is not head and not isinstance(m, nn.Embedding)
             and isinstance(getattr(m, "weight", None), torch.Tensor) and m.weight.ndim == 2}
    return ", ".join(sorted(names)) or "none"
