"""The optimizer's settings beside train.lr: which optimizer (train.optimizer) and GaLore's options (train.galore),
and when GaLore cannot apply to a run (`galore_refusal`). The optimizer itself is train/galore.py."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from tunesmith.config.methods import ALL_LINEAR

OPTIMIZERS = ("adamw", "galore")


class GaloreSettings(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    rank: int = Field(128, gt=0, description="r: each targeted weight's gradient is projected onto its r leading "
                      "singular vectors, so Adam's two moments hold r × (the longer side) numbers instead of the whole "
                      "matrix (capped at the shorter side)")
    update_interval: int = Field(200, gt=0, description="T: optimizer steps between refreshes of each projection, "
                                 "taken from the SVD of that step's gradient")
    scale: float = Field(0.25, gt=0, description="α: the update brought back from the projected space is multiplied "
                         "by it (the paper's 0.25)")
    target_modules: list[str] | str = Field(
        ALL_LINEAR, description="the linear layers whose weights train through the projection: 'all-linear' (every "
        "linear layer of the decoder, the output head never), module name suffixes, or a regex string matched "
        "against full module names; the other trained parameters (embeddings, norms) take plain AdamW")


def galore_refusal(method, distributed_strategy: str | None) -> str | None:
    """Why train.optimizer galore cannot train this run (a sentence), or None where it can."""
    if not method.declaration.memory.linear_weights_train:
        return (f"galore projects the gradients of the base's own weight matrices, but method {method.name} trains "
                "none of them (its parameters are added adapters, scales, biases or virtual tokens), so there is "
                "nothing to project; use method full or freeze, or train.optimizer: adamw")
    if distributed_strategy == "fsdp":
        return ("galore needs each targeted weight's whole gradient for its SVD, but FSDP gives every rank a shard; "
                "use distributed.strategy: ddp, or train.optimizer: adamw")
    return None
