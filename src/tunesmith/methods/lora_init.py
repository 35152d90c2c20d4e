"""LoRA initialisations (`method.init`): the initial A (r × in) and B (out × r) of an adapter with scaling s.

    default   A Kaiming-uniform, B = 0 (PEFT's init_lora_weights=True; what LoraLinear.add_adapter draws)
    gaussian  A ~ N(0, (1/r)²), B = 0 (PEFT's "gaussian")
    pissa     W = U·S·Vᵀ, A = √(S_r/s)·V_rᵀ, B = U_r·√(S_r/s), so s·B·A is W's principal rank-r part (PiSSA,
              Meng et al., 2024); with pissa_niter N, U, S, V from torch.svd_lowrank (PEFT's "pissa_niter_N")
    olora     W = Q·R, A = R_r (first r rows), B = Q_r (first r columns) (OLoRA, Büyükakyüz, 2024; as PEFT:
              the factors are not divided by s)
    loftq     (4-bit bases) alternate Q = quant(W − s·B·A) and s·B·A = the rank-r SVD of W − deq(Q), `loftq_iter`
              times, from B·A = 0 (LoftQ, Li et al., 2023); unlike PEFT, which leaves s out, √(S_r/s) as in pissa

For pissa, olora and loftq the frozen base weight becomes the residual W − s·B0·A0 (loftq: the tensor quantised
last), so base + adapter starts at W; the layer keeps A0 and B0 (`keep_initial`) so that the bare base, its adapter
off, still computes W·x, and saving converts the adapter to a plain LoRA against W (`converted`).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from tunesmith.config.methods import WEIGHT_INITS
from tunesmith.errors import ModelError
from tunesmith.methods.base import set_weight_out_in, weight_out_in

Quantiser = Callable[[torch.Tensor], torch.Tensor]  # a weight -> its 4-bit codes dequantised (quant/nf4.py)


def pissa_factors(w: torch.Tensor, r: int, scaling: float, niter: int | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) with s·B·A the rank-r principal part of w [out, in], in float32."""
    w = w.float()
    if niter is None:
        u, s, vh = torch.linalg.svd(w, full_matrices=False)
        u, s, vh = u[:, :r], s[:r], vh[:r]
    else:
        u, s, v = torch.svd_lowrank(w, q=r, niter=niter)
        vh = v.t()
    root = torch.sqrt(s / scaling)
    return (root.unsqueeze(1) * vh).contiguous(), (u * root).contiguous()


def olora_factors(w: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) = (R's first r rows, Q's first r columns) of w = Q·R."""
    q, rr = torch.linalg.qr(w.float())
    return rr[:r].contiguous(), q[:, :r].contiguous()


def loftq_factors(w: torch.Tensor, r: int, scaling: float, iters: int, quantise: Quantiser
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(A, B, the tensor to quantise as the base): deq(quant(that)) + s·B·A approximates w."""
    w = w.float()
    target = w
    for step in range(iters):
        error = w - quantise(target)
        a, b = pissa_factors(error, r, scaling)
        if step + 1 < iters:
            target = w - scaling * (b @ a)
    return a, b, target


def initialise(layer, name: str, settings, quantise: Quantiser | None = None) -> None:
    """Give adapter `name` of `layer` (a LoraLinear, just added with the default values) its initial values."""
    init = settings.init
    a, b = layer.lora_A[name].weight, layer.lora_B[name].weight
    with torch.no_grad():
        if init == "gaussian":
            torch.nn.init.normal_(a, std=1 / settings.r)
            torch.nn.init.zeros_(b)
        if init not in WEIGHT_INITS:
            return
        if layer.names() != [name]:
            raise ModelError(f"method.init: {init} makes the base weight of a layer the residual of adapter {name!r}, "
                             f"but the layer also holds {sorted(set(layer.names()) - {name})}; give it a model "
                             "without other adapters")
        if not layer.base_layer.weight.dtype.is_floating_point:
            raise ModelError(f"method.init: {init} reads the base weights, which are stored quantised here; load "
                             "the model in full precision (method qlora quantises the residual itself)")
        w = weight_out_in(layer.base_layer).detach()
        scaling = layer.scaling[name]
        if init == "pissa":
            a0, b0 = pissa_factors(w, settings.r, scaling, settings.pissa_niter)
            base = w.float() - scaling * (b0 @ a0)
        elif init == "olora":
            a0, b0 = olora_factors(w, settings.r)
            base = w.float() - scaling * (b0 @ a0)
        else:
            if quantise is None:
                raise ModelError("method.init: loftq fits the adapter to a 4-bit base; use method qlora")
            a0, b0, base = loftq_factors(w, settings.r, scaling, settings.loftq_iter, quantise)
        a.copy_(a0)
        b.copy_(b0)
        set_weight_out_in(layer.base_layer, base)
        layer.keep_initial(name, a0, b0)


def mutates_base(peft_init) -> bool:
    """Whether PEFT's init_lora_weights value leaves a residual base that its saved adapter is for."""
    return isinstance(peft_init, str) and (peft_init.startswith("pissa")
                                           or peft_init in ("olora", "corda", "loftq", "lora_ga"))


def converted(tensors: dict[str, torch.Tensor], initial: dict[str, tuple[torch.Tensor, torch.Tensor]]
              ) -> dict[str, torch.Tensor]:
    """An adapter's PEFT tensors as a plain LoRA against the original weights: s·B·A − s·B0·A0 as the rank-2r pair
    A' = [A; A0], B' = [B, −B0] (the scaling kept by the config's r and alpha: `converted_config`). `initial` maps a
    module's PEFT key prefix (`base_model.model.<module>.`) to its (A0, B0); other modules are padded with zeros."""
    out = dict(tensors)
    for key, a in tensors.items():
        if not key.endswith("lora_A.weight"):
            continue
        prefix = key.removesuffix("lora_A.weight")
        b = tensors[prefix + "lora_B.weight"]
        a0, b0 = initial.get(prefix, (torch.zeros_like(a), torch.zeros_like(b)))
        out[key] = torch.cat([a.detach(), a0.to(a.dtype)], 0)
        out[prefix + "lora_B.weight"] = torch.cat([b.detach(), -b0.to(b.dtype)], 1)
    return out


def converted_config(config: dict) -> dict:
    """PEFT's save_pretrained(path_initial_model_for_weight_conversion=...): rank doubled, alpha doubled (× √2 with
    rslora) so that alpha/r (alpha/√r) stays, and init_lora_weights true (a plain LoRA on the original base)."""
    return {**config, "r": 2 * config["r"], "init_lora_weights": True,
            "lora_alpha": config["lora_alpha"] * (2 ** 0.5 if config["use_rslora"] else 2)}
