"""GaLore (Zhao et al., 2024, "GaLore: Memory-Efficient LLM Training by Gradient Low-Rank Projection"): AdamW whose
moments live in a low-rank projection of each targeted weight matrix's gradient.

For an m × n gradient G with m ≤ n, every T steps (from the first) P = U[:, :r] of G = U·S·Vᵀ (m × r), and each
step R = Pᵀ·G (r × n); Adam's moments follow R with bias correction, N = m̂ / (√v̂ + ε), and the weight moves by
W ← W·(1 − lr·λ) − lr·α·P·N. With m > n the projection is on the other side: Q = V[:, :r] (n × r), R = G·Q
(m × r), the step α·N·Qᵀ. So a targeted matrix keeps 2·r·max(m, n) moments and r·min(m, n) of projection instead
of AdamW's 2·m·n. The moments are kept across a refresh (the paper's choice). Parameters in groups without a `rank`
take plain AdamW (the same with the projection left out and α = 1), so one optimizer holds the whole model's state
and the checkpoint code saves it like AdamW's (its tensors, the projections included, through safetensors).
"""

from __future__ import annotations

import torch
from torch import nn

from tunesmith.errors import ConfigError

PROJECTOR = "projector"


def rank_of(shape: tuple[int, ...], rank: int) -> int:
    return min(rank, *shape)


def _projector(grad: torch.Tensor, rank: int) -> torch.Tensor:
    """The r leading singular vectors of the gradient on its shorter side: U[:, :r] (m ≤ n) or V[:, :r]."""
    g = grad if grad.dtype in (torch.float32, torch.float64) else grad.float()
    u, _, vh = torch.linalg.svd(g, full_matrices=False)
    r = rank_of(tuple(grad.shape), rank)
    p = u[:, :r] if grad.shape[0] <= grad.shape[1] else vh[:r].T
    return p.to(grad.dtype).contiguous()


def project(grad: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    return p.T @ grad if grad.shape[0] <= grad.shape[1] else grad @ p


def project_back(n: torch.Tensor, p: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    return p @ n if shape[0] <= shape[1] else n @ p.T


class GaloreAdamW(torch.optim.Optimizer):
    """AdamW with GaLore's projection for the parameters of groups that carry `rank`, `update_interval`, `scale`."""

    def __init__(self, params, lr: float, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0):
        super().__init__(params, {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay})

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            rank = group.get("rank")
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                step = state["step"] = state.get("step", 0) + 1
                grad = p.grad
                if rank is not None:
                    if (step - 1) % group["update_interval"] == 0:
                        state[PROJECTOR] = _projector(grad, rank)
                    grad = project(grad, state[PROJECTOR])
                if "exp_avg" not in state:
                    state["exp_avg"] = torch.zeros_like(grad)
                    state["exp_avg_sq"] = torch.zeros_like(grad)
                m, v = state["exp_avg"], state["exp_avg_sq"]
                m.lerp_(grad, 1 - beta1)
                v.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
                # N = m̂ / (√v̂ + ε) with m̂ = m / (1 − β1ᵗ), v̂ = v / (1 − β2ᵗ); one temporary of the moments' size
                denom = v.sqrt().div_((1 - beta2 ** step) ** 0.5).add_(group["eps"])
                if group["weight_decay"]:
                    p.mul_(1 - group["lr"] * group["weight_decay"])
                if rank is None:
                    p.addcdiv_(m, denom, value=-group["lr"] / (1 - beta1 ** step))
                    continue
                normalized = torch.div(m, denom, out=denom).div_(1 - beta1 ** step)
                p.add_(project_back(normalized, state[PROJECTOR], p.shape), alpha=-group["lr"] * group["scale"])
        return loss


def _targets(model: nn.Module, targets: list[str] | str) -> list[nn.Parameter]:
    """The trained 2-D weights of the decoder's linear layers `targets` names (the output head and embeddings
    never: they keep plain AdamW)."""
    from tunesmith.plan.parameters import matches

    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    found = []
    for name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        if (module is head or isinstance(module, nn.Embedding) or not isinstance(weight, nn.Parameter)
                or weight.ndim != 2 or not weight.requires_grad or (head is not None and weight is head.weight)):
            continue
        if matches(name.removeprefix("module."), targets):
            found.append(weight)
    return found


def galore_groups(model: nn.Module, groups: list[dict], settings) -> list[dict]:
    """Each of the method's optimizer groups split in two: its targeted weights with GaLore's projection
    (`settings`: train.galore), and the rest with plain AdamW."""
    targeted = {id(p) for p in _targets(model, settings.target_modules)}
    if not targeted:
        raise ConfigError(f"train.galore.target_modules: {settings.target_modules!r} matches no trained weight of a "
                          "linear layer, so GaLore would project nothing; name layers whose weights train (e.g. "
                          "all-linear), or use train.optimizer: adamw")
    out = []
    for group in groups:
        projected = [p for p in group["params"] if id(p) in targeted]
        rest = [p for p in group["params"] if id(p) not in targeted]
        if projected:
            out.append({**group, "params": projected, "rank": settings.rank,
                        "update_interval": settings.update_interval, "scale": settings.scale})
        if rest:
            out.append({**group, "params": rest})
    return out
