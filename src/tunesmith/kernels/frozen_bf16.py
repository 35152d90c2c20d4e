"""Frozen linear weights stored in bf16 for a bf16-autocast run (train.bf16_frozen_weights).

Under bf16 autocast a frozen fp32 nn.Linear weight is cast to bf16 at every forward — autocast caches casts only of
weights that train — and the cast copy is kept for the backward, so each step reads 4 bytes a weight, writes 2 and
holds 6. The product autocast computes takes the bf16 copy either way, so storing the frozen weight in bf16 once
computes exactly the same outputs and gradients with a third of that memory and no cast. Biases stay as they are
(autocast casts them as before). transformers' Conv1D layers (GPT-2: the same product with the weight stored
transposed) are stored the same way.

Only what training never updates and never saves is converted: weights (and biases) that do not require grad, not
shared with another module (a tied LM head is the input embedding, which looks up fp32 rows), and not read directly by
the layer around them (a wrapper class declaring `reads_base_weight`, DoRA, computes its weight norm from the fp32
base: kernels/patches.py). Methods whose artifact is the base itself (full, freeze, bitfit) are never converted (kernels/apply.py).
Outside autocast (a caller that forgot it) the layer computes in bf16 and returns the input's dtype, so nothing fails;
the loop's forwards, evaluation and sample generation run under the run's autocast.

On CPU an fp32 model's weights are views of the safetensors file; the parameters left in place are copied out of it
(kernels/file_mapping.py), so that the fp32 pages the conversion read do not stay in RSS beside their bf16 copies.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from tunesmith.kernels.file_mapping import copy_out_of_file
from tunesmith.kernels.onednn_linear import matrix_layers
from tunesmith.kernels.patches import Patch, PlainLinear, base_weight_readers, conv1d_class, is_conv1d, is_plain_linear


class FrozenBf16Linear(PlainLinear):
    """An nn.Linear whose frozen weight is stored in bf16."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_autocast_enabled(x.device.type) or x.dtype == self.weight.dtype:
            return super().forward(x)
        bias = None if self.bias is None else self.bias.to(self.weight.dtype)
        return F.linear(x.to(self.weight.dtype), self.weight, bias).to(x.dtype)


def _conv1d_forward(self, x: torch.Tensor) -> torch.Tensor:
    if torch.is_autocast_enabled(x.device.type) or x.dtype == self.weight.dtype:
        return self.plain_forward(x)
    with torch.autocast(x.device.type, dtype=self.weight.dtype):  # what the run's autocast would compute
        return self.plain_forward(x).to(x.dtype)


@functools.cache
def _frozen_bf16_conv1d() -> type:
    """A subclass of transformers' Conv1D whose frozen weight is stored in bf16."""
    conv1d = conv1d_class()
    return type("FrozenBf16Conv1D", (conv1d,), {"forward": _conv1d_forward, "plain_forward": conv1d.forward,
                                                "__module__": __name__})


def _convertible(module: nn.Module, shared: set[int], reads_weight: set[int], dtypes: tuple) -> bool:
    if (not (is_plain_linear(module) or is_conv1d(module)) or module.weight.dtype not in dtypes
            or id(module) in reads_weight):
        return False
    params = [p for p in (module.weight, module.bias) if p is not None]
    return not any(p.requires_grad for p in params) and id(module.weight) not in shared


def enable(model: nn.Module) -> Patch:
    """Store the frozen fp32 linear weights of `model` in bf16. Unpatching gives the layers their class back and
    their weights back in fp32, with the bf16 rounding they took."""
    owners: dict[int, int] = {}
    for module in model.modules():
        for p in module.parameters(recurse=False):
            owners[id(p)] = owners.get(id(p), 0) + 1
    shared = {pid for pid, n in owners.items() if n > 1}
    reads_weight = base_weight_readers(model)
    # an fp32 model whose frozen linears loaded in bf16 already (models.load_model's frozen_linears_bf16) takes
    # the layer classes only; a whole-bf16 model (model.dtype: bfloat16) is left as it is
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    mixed = embeddings is None or embeddings.weight.dtype == torch.float32
    dtypes = (torch.float32, torch.bfloat16) if mixed else (torch.float32,)
    converted = []
    for module in model.modules():
        if _convertible(module, shared, reads_weight, dtypes):
            converted.append((module, type(module)))
            module.weight.data = module.weight.data.to(torch.bfloat16)
            module.__class__ = _frozen_bf16_conv1d() if is_conv1d(module) else FrozenBf16Linear
    if converted:  # the converted weights are new tensors already
        copy_out_of_file(p for p in model.parameters() if p.dtype != torch.bfloat16)

    def undo() -> None:
        for module, old_class in converted:
            module.weight.data = module.weight.data.to(torch.float32)
            module.__class__ = old_class

    loaded_bf16 = any((is_plain_linear(m) or is_conv1d(m)) and m.weight.dtype == torch.bfloat16 for m in model.modules())
    reason = "" if converted else ("its frozen linear weights loaded in bf16 already (model.dtype)" if loaded_bf16 else
                                   f"no frozen fp32 nn.Linear or Conv1D to store in bf16 (its layers: "
                                   f"{matrix_layers(model)})")
    return Patch(len(converted), undo, reason=reason)
