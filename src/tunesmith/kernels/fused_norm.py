"""RMSNorm in one fused kernel (`F.rms_norm`) for the Llama-style norms of transformers' models.

Their forward upcasts to fp32, multiplies by rsqrt(mean(x²) + eps), casts back and scales by the weight: four to six
elementwise passes forward and as many backward. For fp32 activations and weights, `F.rms_norm` computes the same
values (bitwise, measured, forward and backward) in one pass each way. Anything else (bf16, autocast, another
norm family) keeps the model's own forward.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tunesmith.kernels.patches import Patch, swap_classes

# classes whose forward is LlamaRMSNorm's (tests/test_fused_norm.py checks each against F.rms_norm)
LLAMA_STYLE = frozenset({"LlamaRMSNorm", "MistralRMSNorm", "MixtralRMSNorm", "Qwen2RMSNorm", "Qwen2MoeRMSNorm",
                         "Qwen3RMSNorm", "Phi3RMSNorm", "SmolLM3RMSNorm", "GraniteRMSNorm"})


def _fused_forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
    weight = self.weight
    if (hidden_states.dtype != torch.float32 or weight.dtype != torch.float32
            or torch.is_autocast_enabled(hidden_states.device.type)):
        return self.unfused_forward(hidden_states)
    return F.rms_norm(hidden_states, weight.shape, weight, self.variance_epsilon)


def enable(model: torch.nn.Module) -> Patch:
    """Give every Llama-style RMSNorm of `model` the fused forward; the patch says how many it changed."""
    if not hasattr(F, "rms_norm"):  # torch < 2.4
        return Patch(0)
    return swap_classes((module, _fused_class(type(module))) for module in model.modules()
                        if type(module).__name__ in LLAMA_STYLE and hasattr(module, "variance_epsilon"))


_FUSED: dict[type, type] = {}


def _fused_class(cls: type) -> type:
    """A subclass of `cls` with the fused forward (a class, not a bound method, so a deepcopy of the model keeps it)."""
    if cls not in _FUSED:
        _FUSED[cls] = type(f"Fused{cls.__name__}", (cls,), {"forward": _fused_forward, "unfused_forward": cls.forward,
                                                           "__module__": __name__})
    return _FUSED[cls]
