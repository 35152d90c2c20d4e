"""The `distributed:` section: how a run launched by torchrun spreads over its ranks (train/distributed.py)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class DistributedSettings(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    strategy: Literal["ddp", "fsdp"] = Field(
        "ddp", description="ddp: every rank holds the whole model and the gradients are all-reduced; fsdp: FSDP2 "
        "(fully_shard per decoder layer and the root), parameters, gradients and optimizer state sharded over the "
        "ranks")
    timeout_s: int = Field(
        600, gt=0, description="how long a rank waits for the others in one collective operation before the whole "
        "job stops with an error (a rank that hangs rather than dies)")
    reshard_after_forward: bool = Field(
        True, description="fsdp: free each layer's gathered parameters after its forward pass and gather them again "
        "for its backward (less memory, one more all-gather of the layers per micro-batch)")


# Objectives and methods a distributed run refuses, with why.
REFUSED_OBJECTIVES = {
    "ppo": "PPO's step (train/ppo_step.py) samples its rollouts and scores them on one process; it is not sharded "
           "over ranks. Train PPO without torchrun (remove the distributed: section)",
    "grpo": "GRPO's step (train/grpo_step.py) samples each group's completions and scores them on one process; it is "
            "not sharded over ranks. Train GRPO without torchrun (remove the distributed: section)",
}
REFUSED_UNDER_FSDP = {
    "qlora": "FSDP shards each parameter along its first dimension, but QLoRA's 4-bit base weights are packed bytes "
             "whose per-block scales belong to the whole flattened tensor (bitsandbytes' Params4bit), so a shard "
             "cannot be gathered back or dequantised on its own. Use distributed.strategy: ddp, or method lora",
}


def refusal(objective: str, method: str, strategy: str) -> str | None:
    """Why this objective or method cannot run under `strategy`, or None."""
    if objective in REFUSED_OBJECTIVES:
        return f"objective: {REFUSED_OBJECTIVES[objective]}"
    if strategy == "fsdp" and method in REFUSED_UNDER_FSDP:
        return f"method.name: {method} with distributed.strategy fsdp: {REFUSED_UNDER_FSDP[method]}"
    return None
