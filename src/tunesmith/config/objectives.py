"""Each alignment objective's options (pydantic, no torch): the `reward:`, `dpo:` and `ppo:` config sections."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class RewardSettings(Strict):
    margin: float = Field(0.0, description="Bradley-Terry with margin: -log σ(r_chosen - r_rejected - margin); "
                                           "a record's own 'margin' field takes precedence")


class DpoSettings(Strict):
    beta: float = Field(0.1, gt=0, description="strength of the pull towards the reference model")
    loss_type: Literal["sigmoid", "ipo"] = "sigmoid"
    label_smoothing: float = Field(0.0, ge=0.0, lt=0.5,
                                   description="conservative DPO: the probability that a pair's label is flipped")

    @model_validator(mode="after")
    def _smoothing_is_for_sigmoid(self) -> "DpoSettings":
        if self.loss_type == "ipo" and self.label_smoothing:
            raise ValueError("label_smoothing applies to loss_type 'sigmoid' only; IPO has no label noise term")
        return self


class PpoSettings(Strict):
    reward_model: str | None = Field(None, description="folder saved by an `objective: reward` run "
                                                       "(its adapter/ or model/)")
    reward_function: str | None = Field(None, description="'package.module:function' or 'path/to/file.py:function'; "
                                        "called as fn(prompts, completions, **info) -> list of floats")
    max_new_tokens: int = Field(32, gt=0, description="longest sampled completion")
    temperature: float = Field(1.0, gt=0, description="sampling temperature of the rollouts")
    top_k: int = Field(0, ge=0, description="0: sample from the whole vocabulary")
    epochs: int = Field(2, gt=0, description="optimisation passes over each rollout")
    minibatch_size: int = Field(8, gt=0, description="completions per optimizer step")
    kl_coef: float = Field(0.05, ge=0, description="per-token KL penalty to the reference, subtracted from the reward")
    clip_range: float = Field(0.2, gt=0, description="policy ratio clip ε")
    value_clip_range: float = Field(0.2, gt=0, description="value prediction clip around the rollout's values")
    value_coef: float = Field(0.1, ge=0, description="weight of the value loss")
    gamma: float = Field(1.0, gt=0, le=1)
    lam: float = Field(0.95, ge=0, le=1, description="GAE λ")
    whiten_advantages: bool = True
    missing_eos_penalty: float | None = Field(None, description="subtracted from the reward of a completion that "
                                                                "hit max_new_tokens without ending")

    @model_validator(mode="after")
    def _one_reward_source(self) -> "PpoSettings":
        if self.reward_model and self.reward_function:
            raise ValueError("set ppo.reward_model or ppo.reward_function, not both")
        return self


OBJECTIVE_SECTIONS = {"reward": RewardSettings, "dpo": DpoSettings, "ppo": PpoSettings}
