"""Each method's options (pydantic, no torch), selected in the config by `method.name`, and what it declares about
itself (`declaration`, config/declarations.py) for config validation, the planner, export and inference."""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from tunesmith.config.declarations import MemoryTerms, MethodDeclaration, Saved

# PEFT's name for every linear layer (nn.Linear, transformers' Conv1D) but the output head, whatever the family
# calls its projections (q_proj…, Phi-3's fused qkv_proj/gate_up_proj, GPT-2's c_attn/c_fc/c_proj).
ALL_LINEAR = "all-linear"
# adapter_model.safetensors' metadata key holding the base as the run's model.path named it (methods/base.py)
BASE_MODEL_KEY = "tunesmith_base_model"
# LoRA initialisations that compute A and B from the base weight W and leave W - s·B·A as the frozen base
WEIGHT_INITS = ("pissa", "olora", "loftq")
TARGETS_HELP = ("'all-linear' (every linear layer but the output head), module name suffixes, or a regex string "
                "matched against full module names")


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    # What the planner (plan/memory.py) reads from a method's settings beside its declaration's memory terms.
    def blocks_with_grad(self, num_layers: int) -> int:
        """Decoder blocks that keep activations for backward."""
        return num_layers

    def head_trains(self) -> bool:
        """Whether the LM head's weight trains."""
        return False

    def bottleneck_width(self, hidden_size: int) -> int:
        """The width `w` of the method's own layers in its saved-activation terms (MemoryTerms.saved_*)."""
        return 0

    def init_reads_weights(self) -> bool:
        """Whether its initial values are computed from the base weights (the declaration's, or an option's)."""
        return self.declaration.init_reads_weights

    def init_residual(self) -> bool:
        """Whether its initialisation replaces the targets' base weights by residuals (new tensors, computed from the
        full-precision weights)."""
        return False


class FullSettings(Strict):
    name: Literal["full"] = "full"
    declaration: ClassVar = MethodDeclaration(
        "whole", artifact="model", trains_base=True, memory=MemoryTerms(linear_weights_train=True),
        not_mergeable="a full fine-tune is already a complete model folder; use it directly as --model")

    def head_trains(self) -> bool:
        return True


class FreezeSettings(Strict):
    name: Literal["freeze"] = "freeze"
    declaration: ClassVar = MethodDeclaration("chosen", trains_base=True,
                                              memory=MemoryTerms(linear_weights_train=True))
    last_layers: int | None = Field(None, gt=0, description="train the last N transformer blocks")
    patterns: list[str] = Field(default_factory=list, description="regexes; parameters whose name matches train")

    @model_validator(mode="after")
    def _something_trains(self) -> "FreezeSettings":
        if self.last_layers is None and not self.patterns:
            raise ValueError("freeze needs last_layers or patterns (otherwise nothing would train)")
        return self

    def blocks_with_grad(self, num_layers: int) -> int:
        """All, except below the lowest trained block."""
        return self.last_layers if self.last_layers and not self.patterns else num_layers

    def head_trains(self) -> bool:
        return "lm_head" in " ".join(self.patterns)


class BitFitSettings(Strict):
    name: Literal["bitfit"] = "bitfit"
    declaration: ClassVar = MethodDeclaration("biases", trains_base=True)
    target_modules: list[str] | str = Field(ALL_LINEAR, description=TARGETS_HELP)


class LoraSettings(Strict):
    name: Literal["lora"] = "lora"
    declaration: ClassVar = MethodDeclaration("low_rank", named_adapters=True, peft_type="LORA",
                                              four_bit_variant="qlora",
                                              memory=MemoryTerms(low_rank=True, fused_dropout=True))
    r: int = Field(16, gt=0, description="the rank of each pair B·A: its trainable parameters grow linearly with it")
    alpha: float = Field(32.0, gt=0, description="the update B·A·x is scaled by alpha/r (alpha/sqrt(r) with rslora)")
    dropout: float = Field(0.05, ge=0.0, lt=1.0, description="dropout on the input of the low-rank branch while "
                           "training; 0: none")
    target_modules: list[str] | str = Field(ALL_LINEAR, description=TARGETS_HELP)
    rslora: bool = Field(False, description="scale by alpha/sqrt(r) instead of alpha/r")
    lr_ratio: float | None = Field(
        None, gt=0, description="LoRA+: each B trains at train.lr × lr_ratio and each A at train.lr, in the optimizer "
        "groups of PEFT's create_loraplus_optimizer (other 1-D parameters go with B; biases and LayerNorm weights "
        "there without weight decay); the LoRA+ paper suggests 16; null: one learning rate for all")
    init: Literal["default", "gaussian", "pissa", "olora", "loftq"] = Field(
        "default", description="the adapter's initial values: default (A Kaiming-uniform, B = 0: PEFT's "
        "init_lora_weights true), gaussian (A normal with std 1/r, B = 0), pissa (A and B from the principal singular "
        "vectors and values of W, the rest left as the frozen base), olora (A and B from the QR decomposition of W, "
        "the rest left as the frozen base), loftq (qlora only: the 4-bit base and the adapter fitted together to W)")
    pissa_niter: int | None = Field(None, gt=0, description="with init pissa: the fast randomised SVD with this "
                                    "many subspace iterations (PEFT's pissa_niter_N); unset: the full SVD")
    loftq_iter: int = Field(1, gt=0, description="with init loftq: how many alternating quantise and low-rank steps")

    @model_validator(mode="after")
    def _init_fits(self) -> "LoraSettings":
        if self.init == "loftq" and self.name != "qlora":
            raise ValueError(f"init: loftq fits the adapter to the error of a 4-bit base, and method {self.name} "
                             "keeps its base in full precision; use method qlora, or init pissa")
        if self.pissa_niter is not None and self.init != "pissa":
            raise ValueError(f"pissa_niter applies to init pissa only (init is {self.init})")
        if self.loftq_iter != 1 and self.init != "loftq":
            raise ValueError(f"loftq_iter applies to init loftq only (init is {self.init})")
        return self

    def init_reads_weights(self) -> bool:
        return self.declaration.init_reads_weights or self.init in WEIGHT_INITS

    def init_residual(self) -> bool:
        return self.init in WEIGHT_INITS


DORA_SAVED = Saved("DoRA W0·x and B·A·x per target", (("q", 2), ("kv", 4), ("h", 4), ("i", 4)))


class DoraSettings(LoraSettings):
    name: Literal["dora"] = "dora"
    declaration: ClassVar = MethodDeclaration(
        "low_rank", named_adapters=True, peft_type="LORA", four_bit_variant="qlora", init_reads_weights=True,
        memory=MemoryTerms(
        low_rank=True, reads_base_weight=True, saved_fp32=(DORA_SAVED,), saved_bf16=(DORA_SAVED,), weight_norms=True))


class QloraSettings(LoraSettings):
    name: Literal["qlora"] = "qlora"
    declaration: ClassVar = MethodDeclaration(
        "low_rank", peft_type="LORA", memory=MemoryTerms(low_rank=True, quantized_base=True),
        fsdp_refusal="FSDP shards each parameter along its first dimension, but QLoRA's 4-bit base weights are packed "
        "bytes whose per-block scales belong to the whole flattened tensor (bitsandbytes' Params4bit), so a shard "
        "cannot be gathered back or dequantised on its own. Use distributed.strategy: ddp, or method lora")
    quant_type: Literal["nf4", "fp4"] = Field("nf4", description="4-bit code for the frozen base linear weights")
    double_quant: bool = Field(True, description="also quantise the per-block scales (8-bit), ~0.4 bit/weight less")
    compute_dtype: Literal["float32", "bfloat16"] = Field("float32", description="dtype the 4-bit weights are "
                                                           "dequantised to for each matmul")


IA3_SAVED = Saved("IA3 rescaled outputs/inputs", (("kv", 2), ("i", 1)))


class IA3Settings(Strict):
    name: Literal["ia3"] = "ia3"
    declaration: ClassVar = MethodDeclaration("scales", peft_type="IA3",
                                              memory=MemoryTerms(saved_fp32=(IA3_SAVED,), saved_bf16=(IA3_SAVED,)))
    target_modules: list[str] | str = Field(
        default_factory=lambda: ["k_proj", "v_proj", "down_proj"], description="the layers whose output (or input, "
        "for feedforward_modules) is scaled: module name suffixes, or a regex string matched against full module names")
    feedforward_modules: list[str] | str = Field(
        default_factory=lambda: ["down_proj"], description="targets whose input (not output) is rescaled")


# LoHa and LoKr build each target's ΔW (its weight's whole shape) at every forward; the product taking it keeps it and
# the adapted linears' inputs for backward
LYCORIS_MEMORY = MemoryTerms(
    delta_weights=True, saved_fp32=(Saved("inputs of the adapted linears", (("h", 2), ("q", 1), ("i", 1))),),
    saved_bf16=(Saved("inputs of the adapted linears (bf16)", (("h", 2), ("q", 1), ("i", 1))),))
RANK_DROPOUT_HELP = ("while training, the probability of zeroing each output row of ΔW (PEFT's rank dropout); "
                     "0: none")
MODULE_DROPOUT_HELP = ("while training, the probability that a targeted layer skips its ΔW for a whole forward "
                       "(PEFT's module dropout); 0: never")


class LohaSettings(Strict):
    name: Literal["loha"] = "loha"
    declaration: ClassVar = MethodDeclaration("hadamard", peft_type="LOHA", memory=LYCORIS_MEMORY)
    r: int = Field(8, gt=0, description="the rank of each of the two pairs whose products are multiplied element "
                   "by element: ΔW has rank up to r², for the parameters of a rank-2r LoRA")
    alpha: float = Field(8.0, gt=0, description="ΔW is scaled by alpha/r")
    rank_dropout: float = Field(0.0, ge=0.0, lt=1.0, description=RANK_DROPOUT_HELP + " (the kept rows rescaled)")
    module_dropout: float = Field(0.0, ge=0.0, lt=1.0, description=MODULE_DROPOUT_HELP)
    target_modules: list[str] | str = Field(ALL_LINEAR, description=TARGETS_HELP)
    init_weights: bool = Field(True, description="true: one factor starts at zero, so training starts from the "
                               "base; false: every factor random (PEFT discourages it)")


class LokrSettings(Strict):
    name: Literal["lokr"] = "lokr"
    declaration: ClassVar = MethodDeclaration("kronecker", peft_type="LOKR", memory=LYCORIS_MEMORY)
    r: int = Field(8, gt=0, description="the rank of a Kronecker factor stored as a low-rank pair (PEFT's rule: the "
                   "second factor when r is under half its larger side, the first too with decompose_both)")
    alpha: float = Field(8.0, gt=0, description="ΔW is scaled by alpha/r")
    rank_dropout: float = Field(0.0, ge=0.0, lt=1.0, description=RANK_DROPOUT_HELP)
    rank_dropout_scale: bool = Field(False, description="rescale the rows rank_dropout keeps by one over their "
                                     "fraction")
    module_dropout: float = Field(0.0, ge=0.0, lt=1.0, description=MODULE_DROPOUT_HELP)
    target_modules: list[str] | str = Field(ALL_LINEAR, description=TARGETS_HELP)
    decompose_both: bool = Field(False, description="store the first Kronecker factor as a rank-r pair too, where "
                                 "r is under half its larger side")
    decompose_factor: int = Field(-1, description="split each width into factor × width/factor where factor divides "
                                  "it (else the divisor pair nearest the square root with its smaller part at most "
                                  "factor); -1: nearest the square root")
    init_weights: bool | Literal["lycoris"] = Field(
        True, description="true: the first factor starts at zero, so training starts from the base; lycoris: the "
        "second one does instead (the LyCORIS library's way); false: every factor random (PEFT discourages it)")

    @model_validator(mode="after")
    def _factor_valid(self) -> "LokrSettings":
        if self.decompose_factor == 0 or self.decompose_factor < -1:
            raise ValueError(f"decompose_factor must be -1 or a positive integer, got {self.decompose_factor}")
        return self


# per target: A·x (r, "w") for λ_d's gradient and the branch's output before λ_b (k) for λ_b's; 7 targets
VERA_SAVED = Saved("VeRA A·x and B·(λ_d ⊙ A·x) per target", (("w", 7), ("q", 1), ("kv", 2), ("h", 2), ("i", 2)))


class VeraSettings(Strict):
    name: Literal["vera"] = "vera"
    declaration: ClassVar = MethodDeclaration(
        "projection_scales", peft_type="VERA",
        memory=MemoryTerms(shared_projections=True, dropout_noise_only=True,
                           saved_fp32=(VERA_SAVED,), saved_bf16=(VERA_SAVED,)))
    r: int = Field(256, gt=0, description="the rank of the shared random projections A and B; each target trains r + "
                   "its output width scales, so r costs little (PEFT's default, 256)")
    d_initial: float = Field(0.1, description="the initial value of every entry of each target's λ_d (λ_b starts at "
                             "0, so the model starts as the base); the paper recommends 0.1 or less")
    projection_prng_key: int = Field(0, ge=0, description="the seed of the torch.Generator that draws the shared A "
                                     "and B (kaiming-uniform, as PEFT draws them)")
    save_projection: bool = Field(True, description="store A and B in the adapter; false: only the scales are "
                                  "stored and loading draws A and B again from projection_prng_key")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="dropout on the input of each target's VeRA branch "
                           "while training; 0: none")
    target_modules: list[str] | str = Field(
        ALL_LINEAR, description=TARGETS_HELP + "; A and B are sized to the widest targeted input and output, and "
        "each target reads its corner of them")

    def bottleneck_width(self, hidden_size: int) -> int:
        """The width of VeRA's own activations: A·x has r features."""
        return self.r


class AdapterSettings(Strict):
    name: Literal["adapter"] = "adapter"
    declaration: ClassVar = MethodDeclaration(
        "bottleneck",
        not_mergeable="bottleneck adapters add a nonlinear layer that the base architecture has no place for, "
        "so they cannot be merged into its weights; use the adapter with --adapter instead",
        memory=MemoryTerms(saved_fp32=(Saved("adapter inputs and bottleneck", (("h", 2), ("w", 4))),),
                           saved_bf16=(Saved("adapter inputs (bf16 base outputs) and activations",
                                             (("h", 2), ("w", 2))),)))
    reduction_factor: int = Field(16, gt=0, description="bottleneck width = hidden_size / reduction_factor")
    placement: Literal["attention", "mlp", "both"] = Field(
        "both", description="where the bottleneck layers go: after attention's output projection (o_proj), after the "
        "MLP's (down_proj), or both")
    activation: Literal["relu", "gelu", "silu"] = Field("relu", description="the nonlinearity between each "
                                                         "bottleneck's down and up projections")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="dropout before each bottleneck's up projection while "
                           "training; 0: none")

    def bottleneck_width(self, hidden_size: int) -> int:
        return max(1, hidden_size // self.reduction_factor)


class PromptSettings(Strict):
    name: Literal["prompt"] = "prompt"
    declaration: ClassVar = MethodDeclaration(
        "virtual", init_reads_weights=True, peft_type="PROMPT_TUNING",
        not_mergeable="soft prompts are learned input embeddings placed before the text, not changes to any weight, "
        "so there is nothing to fold into the base; use the adapter with --adapter instead",
        memory=MemoryTerms(virtual="embeddings"))
    num_virtual_tokens: int = Field(20, gt=0, description="how many trained embeddings are put before every input")
    init: Literal["random", "vocab", "text"] = Field(
        "random", description="their initial values: random (normal, at the scale of the real embeddings), vocab "
        "(the embeddings of random vocabulary tokens) or text (init_text's token embeddings, repeated to length)")
    init_text: str | None = Field(None, description="the text whose token embeddings start the prompt, with init: "
                                  "text")

    @model_validator(mode="after")
    def _text_given(self) -> "PromptSettings":
        if self.init == "text" and not self.init_text:
            raise ValueError("init: text needs init_text")
        return self


PREFIX = MethodDeclaration(
    "virtual", init_reads_weights=True, peft_type="PREFIX_TUNING",
    not_mergeable="prefixes are learned keys and values every attention layer attends to, not changes to any "
    "weight, so there is nothing to fold into the base; use the adapter with --adapter instead",
    memory=MemoryTerms(virtual="key_values"))
PREFIX_LENGTH_HELP = "how many trained key and value positions every attention layer attends to before the text"


class PrefixSettings(Strict):
    name: Literal["prefix"] = "prefix"
    declaration: ClassVar = PREFIX
    num_virtual_tokens: int = Field(20, gt=0, description=PREFIX_LENGTH_HELP)
    projection: bool = Field(True, description="train through an MLP reparameterisation (folded away on save)")
    projection_hidden: int = Field(512, gt=0, description="the hidden width of that MLP")


class PtuningV2Settings(Strict):
    name: Literal["ptuning-v2"] = "ptuning-v2"
    declaration: ClassVar = PREFIX
    projection: ClassVar[bool] = False  # prefix tuning without the MLP reparameterisation
    num_virtual_tokens: int = Field(20, gt=0, description=PREFIX_LENGTH_HELP)


MethodSettings = (FullSettings | FreezeSettings | BitFitSettings | LoraSettings | DoraSettings | QloraSettings
                  | IA3Settings | LohaSettings | LokrSettings | VeraSettings | AdapterSettings | PromptSettings
                  | PrefixSettings | PtuningV2Settings)

METHOD_NAMES = [c.model_fields["name"].default for c in MethodSettings.__args__]


def settings_class(name: str):
    return next((c for c in MethodSettings.__args__ if c.model_fields["name"].default == name), None)
