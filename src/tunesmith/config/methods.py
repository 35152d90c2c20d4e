"""Each method's options (pydantic, no torch), selected in the config by `method.name`."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class FullSettings(Strict):
    name: Literal["full"] = "full"


class FreezeSettings(Strict):
    name: Literal["freeze"] = "freeze"
    last_layers: int | None = Field(None, gt=0, description="train the last N transformer blocks")
    patterns: list[str] = Field(default_factory=list, description="regexes; parameters whose name matches train")

    @model_validator(mode="after")
    def _something_trains(self) -> "FreezeSettings":
        if self.last_layers is None and not self.patterns:
            raise ValueError("freeze needs last_layers or patterns (otherwise nothing would train)")
        return self


class BitFitSettings(Strict):
    name: Literal["bitfit"] = "bitfit"
    target_modules: list[str] | str = Field(default_factory=lambda: list(ALL_LINEAR))


class LoraSettings(Strict):
    name: Literal["lora"] = "lora"
    r: int = Field(16, gt=0)
    alpha: float = Field(32.0, gt=0)
    dropout: float = Field(0.05, ge=0.0, lt=1.0)
    target_modules: list[str] | str = Field(
        default_factory=lambda: list(ALL_LINEAR),
        description="module name suffixes, or a regex string matched against full module names",
    )
    rslora: bool = Field(False, description="scale by alpha/sqrt(r) instead of alpha/r")


class DoraSettings(LoraSettings):
    name: Literal["dora"] = "dora"


class QloraSettings(LoraSettings):
    name: Literal["qlora"] = "qlora"
    quant_type: Literal["nf4", "fp4"] = Field("nf4", description="4-bit code for the frozen base linear weights")
    double_quant: bool = Field(True, description="also quantise the per-block scales (8-bit), ~0.4 bit/weight less")
    compute_dtype: Literal["float32", "bfloat16"] = Field("float32", description="dtype the 4-bit weights are "
                                                           "dequantised to for each matmul")


class IA3Settings(Strict):
    name: Literal["ia3"] = "ia3"
    target_modules: list[str] | str = Field(default_factory=lambda: ["k_proj", "v_proj", "down_proj"])
    feedforward_modules: list[str] | str = Field(
        default_factory=lambda: ["down_proj"], description="targets whose input (not output) is rescaled")


class AdapterSettings(Strict):
    name: Literal["adapter"] = "adapter"
    reduction_factor: int = Field(16, gt=0, description="bottleneck width = hidden_size / reduction_factor")
    placement: Literal["attention", "mlp", "both"] = "both"
    activation: Literal["relu", "gelu", "silu"] = "relu"
    dropout: float = Field(0.0, ge=0.0, lt=1.0)


class PromptSettings(Strict):
    name: Literal["prompt"] = "prompt"
    num_virtual_tokens: int = Field(20, gt=0)
    init: Literal["random", "vocab", "text"] = "random"
    init_text: str | None = None

    @model_validator(mode="after")
    def _text_given(self) -> "PromptSettings":
        if self.init == "text" and not self.init_text:
            raise ValueError("init: text needs init_text")
        return self


class PrefixSettings(Strict):
    name: Literal["prefix"] = "prefix"
    num_virtual_tokens: int = Field(20, gt=0)
    projection: bool = Field(True, description="train through an MLP reparameterisation (folded away on save)")
    projection_hidden: int = Field(512, gt=0)


class PtuningV2Settings(Strict):
    name: Literal["ptuning-v2"] = "ptuning-v2"
    num_virtual_tokens: int = Field(20, gt=0)


MethodSettings = (FullSettings | FreezeSettings | BitFitSettings | LoraSettings | DoraSettings | QloraSettings
                  | IA3Settings | AdapterSettings | PromptSettings | PrefixSettings | PtuningV2Settings)

METHOD_NAMES = ["full", "freeze", "bitfit", "lora", "dora", "qlora", "ia3", "adapter", "prompt", "prefix", "ptuning-v2"]


def settings_class(name: str):
    return next((c for c in MethodSettings.__args__ if c.model_fields["name"].default == name), None)
