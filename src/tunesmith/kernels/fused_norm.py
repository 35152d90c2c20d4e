"""RMSNorm as one autograd node (kernels/rms_norm_function.py) for the RMSNorm classes of transformers' models.

Their forward upcasts to fp32, multiplies by rsqrt(mean(x²) + eps), casts back and scales by the weight (Llama,
Mistral, Qwen, Phi-3, SmolLM) or by 1 + the weight (Gemma's convention): four to six elementwise passes forward and
more backward (torch's own F.rms_norm is a composite on CPU with a ~20-pass backward). The node computes the same
values with a hand-written backward of six passes.

Which classes those are is not a list of names: a module with a 1-D weight, an epsilon (`variance_epsilon` or
`eps`), no bias and no submodules is run once per class on a random input with a random weight, and is fused only
where its output equals `F.rms_norm`'s with that weight or with 1 + it. A norm whose forward differs (LayerNorm's
mean subtraction and bias, a scale folded elsewhere) keeps its own forward.

Under CPU bf16 autocast, the norms only linear layers read (`_pre_norms`) write their output in bf16 once, instead
of every consumer casting the fp32 output again; the other norms, and bf16 activations, keep the model's own forward.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F

from tunesmith.kernels.patches import Patch, swap_classes
from tunesmith.kernels.rms_norm_function import rms_norm

_EPSILONS = ("variance_epsilon", "eps")
PLAIN, OFFSET = "weight", "1 + weight"  # what scales the normalised input


def _epsilon_name(module: torch.nn.Module) -> str | None:
    return next((name for name in _EPSILONS if isinstance(getattr(module, name, None), float)), None)


def _candidate(module: torch.nn.Module) -> bool:
    weight = getattr(module, "weight", None)
    return (isinstance(weight, torch.nn.Parameter) and weight.ndim == 1 and getattr(module, "bias", None) is None
            and _epsilon_name(module) is not None and next(module.children(), None) is None
            and not hasattr(type(module), "unfused_forward"))  # not fused already


@torch.no_grad()
def _scaling(module: torch.nn.Module) -> str | None:
    """PLAIN or OFFSET where the module's forward is F.rms_norm with its weight or 1 + it, else None."""
    g = torch.Generator().manual_seed(0)
    n = module.weight.shape[0]
    probe = copy.deepcopy(module)
    probe.weight = torch.nn.Parameter(torch.rand(n, generator=g) + 0.5)  # a new tensor: also where FSDP shards it
    probe = probe.float().cpu()
    x = torch.randn(3, n, generator=g) * 3
    try:
        out = probe(x)
    except Exception:  # a forward that needs more than one tensor is no RMSNorm
        return None
    eps = getattr(probe, _epsilon_name(probe))
    for scaling, weight in ((PLAIN, probe.weight), (OFFSET, 1.0 + probe.weight)):
        if out.shape == x.shape and torch.allclose(out, F.rms_norm(x, (n,), weight, eps), rtol=1e-6, atol=1e-6):
            return scaling
    return None


def _fused_forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
    weight = self.weight
    if hidden_states.dtype != torch.float32 or weight.dtype != torch.float32:
        return self.unfused_forward(hidden_states)
    out_dtype = None
    device = hidden_states.device.type
    if torch.is_autocast_enabled(device):
        if not (self.emits_bf16 and device == "cpu" and torch.get_autocast_dtype(device) == torch.bfloat16):
            return self.unfused_forward(hidden_states)
        out_dtype = torch.bfloat16  # what each consumer's autocast would cast it to, written once
    return rms_norm(hidden_states, weight, getattr(self, self.fused_epsilon), self.fused_scaling == OFFSET, out_dtype)


def enable(model: torch.nn.Module) -> Patch:
    """Give every RMSNorm of `model` the fused forward; the patch says how many it changed (none: why)."""
    if not hasattr(F, "rms_norm"):  # torch < 2.4
        return Patch(0, reason="this torch has no F.rms_norm")
    classes: dict[type, str | None] = {}
    pairs = []
    for module in model.modules():
        if not _candidate(module):
            continue
        cls = type(module)
        if cls not in classes:
            classes[cls] = _scaling(module)
        if classes[cls] is not None:
            pairs.append((module, _fused_class(cls, classes[cls], _epsilon_name(module))))
    if pairs:
        patch = swap_classes(pairs, also_undo=lambda module: module.__dict__.pop("emits_bf16", None))
        read_by_linears = _pre_norms(model)
        for module, _ in pairs:
            if id(module) in read_by_linears:
                module.emits_bf16 = True
        return patch
    norms = sorted({type(m).__name__ for m in model.modules() if "norm" in type(m).__name__.lower()})
    return Patch(0, reason=f"no RMSNorm computes what F.rms_norm does (norms: {', '.join(norms) or 'none'})")


_FUSED: dict[tuple, type] = {}
PRE_NORMS = {"input_layernorm", "post_attention_layernorm"}


def _pre_norms(model: torch.nn.Module) -> set[int]:
    """ids of the norms whose output only linear layers read, so that under bf16 autocast it may be written in bf16
    once: a decoder layer's `input_layernorm` (read by q, k, v) and `post_attention_layernorm` (read by the MLP's
    input projections) where those are the layer's only norms (Llama, Mistral, Qwen, Phi-3, Gemma 1). A layer with
    more norms (Gemma 2/3's pre/post feed-forward norms, OLMo 2's post-norms) may add a norm's output to the residual
    stream, which stays fp32, so its norms keep the model's own forward under autocast."""
    found = set()
    for layer in model.modules():
        norms = {name for name, child in layer.named_children() if "norm" in type(child).__name__.lower()}
        if norms == PRE_NORMS:
            found.update(id(getattr(layer, name)) for name in PRE_NORMS)
    return found


def _fused_class(cls: type, scaling: str, epsilon: str) -> type:
    """A subclass of `cls` with the fused forward (a class, not a bound method, so a deepcopy of the model keeps it)."""
    key = (cls, scaling, epsilon)
    if key not in _FUSED:
        _FUSED[key] = type(f"Fused{cls.__name__}", (cls,), {
            "forward": _fused_forward, "unfused_forward": cls.forward, "fused_scaling": scaling,
            "fused_epsilon": epsilon, "emits_bf16": False, "__module__": __name__})
    return _FUSED[key]
