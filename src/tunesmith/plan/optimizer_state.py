"""The optimizer's state as the planner counts it: AdamW's two moments per trained parameter, or, with
train.optimizer galore (train/galore.py), each targeted m × n matrix's projected moments and projection,
2·r·max(m, n) + r·min(m, n) numbers with r = min(rank, m, n), and AdamW's moments for every other trained
parameter; and the transient of the SVD that refreshes a projection."""

from __future__ import annotations

from tunesmith.config import RunConfig
from tunesmith.plan.architectures import Architecture
from tunesmith.plan.parameters import ParameterPlan, linears, matches, numel

ADAMW_MOMENTS = 2


def galore_targets(arch: Architecture, cfg: RunConfig, plan: ParameterPlan) -> dict[str, tuple[int, int]]:
    """Name → (out, in) shape of the trained weights GaLore projects: the decoder's linears train.galore names (the
    output head never), among the tensors the method trains."""
    targets = cfg.train.galore.target_modules
    names = {f"{lin.name}.weight" for lin in linears(arch) if lin.name != "lm_head" and matches(lin.name, targets)}
    return {name: shape for name, (shape, _) in plan.saved.items() if name in names}


def galore_elements(shape: tuple[int, int], rank: int) -> int:
    """Exp_avg and exp_avg_sq of the projected gradient (r × the longer side each) and the projection (the shorter
    side × r)."""
    m, n = shape
    r = min(rank, m, n)
    return 2 * r * max(m, n) + r * min(m, n)


def optimizer_state(arch: Architecture, cfg: RunConfig, plan: ParameterPlan, nbytes: int) -> tuple[str, int, str]:
    """(what, bytes, how they add up), each number in the trained parameters' dtype (`nbytes` bytes)."""
    t = plan.trainable
    if cfg.train.optimizer != "galore":
        return ("AdamW moments", ADAMW_MOMENTS * t * nbytes,
                f"2 × {t:,} × {nbytes} B (fused AdamW: exp_avg, exp_avg_sq in the parameter's dtype)")
    rank = cfg.train.galore.rank
    shapes = list(galore_targets(arch, cfg, plan).values())
    projected = sum(galore_elements(s, rank) for s in shapes)
    rest = t - sum(m * n for m, n in shapes)
    return ("GaLore state", (projected + ADAMW_MOMENTS * rest) * nbytes,
            f"{len(shapes)} projected matrices: Σ 2·r·max(m,n) + r·min(m,n) = {projected:,} (r = {rank}), and "
            f"AdamW's 2 × {rest:,} for the other trained parameters, × {nbytes} B")


def step_transient(arch: Architecture, cfg: RunConfig, plan: ParameterPlan) -> int:
    """Numbers GaLore's step holds for one parameter at a time beside the gradients and the state: refreshing the
    largest projection's SVD (torch.linalg.svd, LAPACK's gesdd: a copy of G, U (m × k), S, Vᵀ (k × n) and about
    4·k² of work, k = min(m, n)), or the denominator √v̂ + ε of the largest parameter it updates unprojected (an
    embedding: fused AdamW has no such temporary); 0 without GaLore."""
    if cfg.train.optimizer != "galore":
        return 0
    projected = galore_targets(arch, cfg, plan)
    svd = max((m * n + m * min(m, n) + min(m, n) + min(m, n) * n + 4 * min(m, n) ** 2
               for m, n in projected.values()), default=0)
    plain = max((numel(shape) for name, (shape, _) in plan.saved.items() if name not in projected), default=0)
    return max(svd, plain)
