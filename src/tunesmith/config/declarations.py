"""What a method or an objective declares about itself for the rest of the system, as plain data (no torch).

Config validation, the data pipeline, the planner, the forgetting pass, export and inference read these instead of
comparing names. A method's declaration sits on its settings class (config/methods.py, `Settings.declaration`), an
objective's on its config entry (config/objectives.py); the protocols that the code of a method or an objective
satisfies are methods/protocol.py and objectives/protocol.py, which re-export these classes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True)
class Saved:
    """Bytes a method's layers keep for backward per token and decoder block, beyond what every block keeps: a sum
    of the block's widths (h hidden, q query, kv key/value, i intermediate, w the method's own width) times
    `coefficients`, times the bytes of an activation."""
    what: str
    coefficients: tuple[tuple[str, int], ...]


@dataclass(frozen=True)
class MemoryTerms:
    """What the planner (plan/memory.py, plan/parameters.py) needs to know about a method's memory."""
    linear_weights_train: bool = False   # the base's linear weights train (full, freeze): they keep their inputs
    low_rank: bool = False               # A·x of rank r on 7 targets, with dropout on the input (LoRA's family)
    fused_dropout: bool = False          # dropout inside methods/lora_function.py's node (fp32 only)
    quantized_base: bool = False         # the frozen base linears in 4 bits (settings quant_type, double_quant)
    reads_base_weight: bool = False      # its targets read their fp32 base weight (not stored in bf16)
    virtual: Literal["", "embeddings", "key_values"] = ""  # virtual tokens: as inputs, or as attention's k/v prefix
    saved_fp32: tuple[Saved, ...] = ()   # its layers' saved activations without autocast
    saved_bf16: tuple[Saved, ...] = ()   # ... under bf16 autocast
    weight_norms: bool = False           # DoRA: ||W0 + s·B·A|| of each target
    delta_weights: bool = False          # each target's ΔW of its weight's shape, built at every forward and kept for
    #   backward by the product that takes it (LoHa, LoKr)
    dropout_noise_only: bool = False     # its dropout feeds only products with frozen matrices (VeRA's A): autograd
    #   keeps CPU dropout's noise for each target, not the dropped inputs
    shared_projections: bool = False     # VeRA: one frozen pair A (r × the targets' widest input) and B (their
    #   widest output × r) that every target reads, held in fp32 beside the weights


@dataclass(frozen=True)
class MethodDeclaration:
    # what it trains, as plan/parameters.py counts it: the whole model, base parameters chosen by name, the linears'
    # biases, low-rank pairs on the targets, scaling vectors, scaling vectors around shared frozen projections,
    # LoHa's two pairs, LoKr's Kronecker factors, bottleneck layers, or virtual tokens
    parameters: Literal["whole", "chosen", "biases", "low_rank", "scales", "projection_scales", "hadamard",
                        "kronecker", "bottleneck", "virtual"]
    artifact: str = "adapter"            # the run folder's subfolder the trained artifact is saved in
    not_mergeable: str | None = None     # why it cannot be merged into the base; None: it can
    trains_base: bool = False            # its trainable parameters are the base's own (stored in model.dtype)
    named_adapters: bool = False         # several adapters load into one model by name (load(..., name))
    fsdp_refusal: str | None = None      # why it cannot run under distributed.strategy fsdp; None: it can
    init_reads_weights: bool = False     # its initial values are computed from the base weights (DoRA's norms,
    #   virtual tokens from embeddings or activations), so FSDP loads the whole model before sharding it
    peft_type: str | None = None         # the peft_type of the adapter it saves where PEFT loads it (LORA, IA3,
    #   ...); None: tunesmith's own adapter format, or a whole model
    four_bit_variant: str | None = None  # the method that trains the same parameters over a 4-bit base (the
    #   planner's advice when memory is short); its settings are a superset of this one's
    memory: MemoryTerms = MemoryTerms()


@dataclass(frozen=True)
class ObjectiveDeclaration:
    name: str
    formats: tuple[str, ...]             # the data formats it reads (data/formats.py); () with fixed_format
    described: str                       # what such records hold, for the error naming a wrong format
    section: type | None = None          # the settings class of its config section `cfg.<name>`; None: none
    reference: Literal["", "cached", "forward"] = ""  # a reference policy (the model before training): none, its
    #   log-probs computed once before training where the base trains (DPO), or forwards during training (KTO, PPO)
    reference_weight: str = ""           # its section's field that switches the reference forwards off at 0
    teacher: bool = False                # a teacher's forward scores the answers (distill): the planner counts it
    head: tuple[str, int] | None = None  # a scalar head the planner counts: (what, its parameters beyond h)
    scores_logps: bool = False           # it scores sequences' per-token log-probs (DPO's family, PPO, GRPO)
    rollout_buffers: int = 0             # values kept per rollout token (PPO: tokens, log-probs, ..., returns)
    pairs: bool = False                  # two sequences per example (chosen and rejected; KTO's KL completion)
    samples: bool = False                # it samples its own answers: the prompts are kept whole
    fixed_format: str | None = None      # the records it reads whatever the formats (data.format stays auto)
    lm_loss: bool = True                 # it trains the LM head's next-token distribution (forgetting scores it)
    own_head: str | None = None          # what it reads instead of the LM head's logits (then train.loss_chunk has
    #   nothing to chunk); None: the LM head
    mixes_tasks: bool = False            # data.tasks mixtures apply (token-level losses that mix)
    task_formats: tuple[str, ...] = ()   # formats a task of a data.tasks mixture may have beyond `formats`
    default_overlong: str = "drop"       # data.overlong when unset
    split_refusal: str | None = None     # why data.overlong: split cannot apply; None: it can
    prompt_never_trained: str | None = None  # why data.train_on_prompt: true cannot apply; None: it can
    accumulates_itself: str | None = None    # why train.grad_accum must stay 1; None: it may be raised
    not_distributed: str | None = None   # why it cannot run under torchrun; None: it can
