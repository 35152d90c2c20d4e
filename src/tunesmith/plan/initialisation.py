"""What a LoRA initialisation that leaves residuals (method.init pissa, olora, loftq: methods/lora_init.py) holds
while it runs, as (what, bytes, how) rows for plan/memory.py."""

from __future__ import annotations

from tunesmith.config import RunConfig
from tunesmith.plan.architectures import Architecture
from tunesmith.plan.parameters import linears, matches


def initialisation_parts(arch: Architecture, cfg: RunConfig) -> list[tuple[str, int, str]]:
    """Each target's residual is a new tensor beside the weight as read (the file's page on CPU), and one target at
    a time is decomposed in fp32."""
    dtype_bytes = 2 if cfg.weights_dtype == "bfloat16" else 4
    targets = [lin.in_features * lin.out_features for lin in linears(arch)
               if lin.name != "lm_head" and matches(lin.name, cfg.method.target_modules)]
    largest = max(targets, default=0)
    return [("initialisation residuals", sum(targets) * dtype_bytes,
             f"{sum(targets):,} target weights × {dtype_bytes} B, W − s·B0·A0 beside W as read"),
            ("decomposition of one target", largest * 4 * 3,
             f"the largest target ({largest:,} weights) in fp32, and its SVD / QR factors (≤ 2 × its size)")]
