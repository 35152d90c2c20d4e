"""The `distributed:` section: how a run launched by torchrun spreads over its ranks (train/distributed.py)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from tunesmith.config.declarations import ObjectiveDeclaration


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


def refusal(objective: ObjectiveDeclaration, method, strategy: str) -> str | None:
    """Why this objective or method (its settings) cannot run under `strategy`, or None."""
    if objective.not_distributed:
        return f"objective: {objective.not_distributed}"
    if strategy == "fsdp" and method.declaration.fsdp_refusal:
        return f"method.name: {method.name} with distributed.strategy fsdp: {method.declaration.fsdp_refusal}"
    return None
