"""The activations one token keeps for backward in one decoder block, term by term, in fp32 and under bf16 autocast:
what the decoder, tunesmith's kernels and the method save (tests/test_plan.py checks the terms against the bytes
autograd saves). plan/memory.py multiplies them by tokens and blocks."""

from __future__ import annotations

from tunesmith.config import RunConfig
from tunesmith.config.declarations import Saved
from tunesmith.plan.architectures import Architecture

SDPA_LSE_BYTES = 4      # the log-sum-exp SDPA keeps per query and head, fp32


def saved_per_token_layer(arch: Architecture, cfg: RunConfig, attention_bf16: bool = False) -> tuple[int, str]:
    """Bytes one token keeps for backward in one decoder block, and how they add up. `attention_bf16`: under bf16
    autocast, segment attention keeps bf16 inputs (kernels/attention_precision.py) rather than upcasting them."""
    if cfg.train.activation_checkpointing:
        return arch.hidden_size * 4, "block input only (checkpointing): h × 4 B"
    terms = saved_under_bf16_autocast(arch, cfg, attention_bf16) if cfg.train.bf16 else saved_in_fp32(arch, cfg)
    return sum(terms.values()), " + ".join(f"{k} {v:,}" for k, v in terms.items())


def saved_in_fp32(arch: Architecture, cfg: RunConfig) -> dict[str, int]:
    """What a block keeps without autocast (fp32 activations throughout)."""
    h, q, kv, i = arch.hidden_size, arch.q_dim, arch.kv_dim, arch.intermediate_size
    low = 4
    method = cfg.method
    terms_of = method.declaration.memory
    weights_train, low_rank = terms_of.linear_weights_train, terms_of.low_rank
    dropout = low_rank and method.dropout > 0
    # tensors every block keeps when gradient flows through it (whatever trains): the two RMSNorm inputs (the fp32
    # residual stream), q/k/v after rotary (segment attention upcasts them to fp32 on CPU) and SDPA's output and
    # log-sum-exp, SiLU's input, its output and up_proj's output (the gated product keeps both)
    terms = {"norm inputs 2h": 2 * h * 4, "q, k, v": (q + 2 * kv) * 4, "attention out": q * 4 + arch.num_heads *
             SDPA_LSE_BYTES, "gate, silu, up 3i": 3 * i * low}
    # methods/lora_function.py drops inside its node: x kept once for all its readers, the mask as booleans
    fused_dropout = dropout and terms_of.fused_dropout and cfg.weights_dtype == "float32"
    needs_input = weights_train or (low_rank and not dropout) or fused_dropout
    if needs_input:  # a trained or adapted linear keeps its input
        terms["linear inputs (normed 2h, o_in q, down_in i)"] = (2 * h + q + i) * low
    if fused_dropout:
        terms["dropout masks, 1 B a feature"] = 5 * h + q + i
    elif dropout:  # each adapted linear keeps its own dropped input, and CPU dropout its scaled noise (same dtype)
        d_sum = 5 * h + q + i
        terms["dropped inputs + noise"] = d_sum * 2 * low
    if low_rank:
        terms["low-rank A·x, 7 targets"] = 7 * method.r * low
    if terms_of.dropout_noise_only and method.dropout > 0:
        terms["dropout noise of each target's input"] = (5 * h + q + i) * low
    if terms_of.virtual:  # transformers' SDPA path (not segment attention) under a mask
        terms["k, v repeated to every query head"] = 2 * (q - kv) * 4
    terms.update(method_saved(terms_of.saved_fp32, arch, method, low))
    return terms


def method_saved(saved: tuple[Saved, ...], arch: Architecture, method, nbytes: int) -> dict[str, int]:
    """The method's own saved-activation terms (its declaration's MemoryTerms.saved_*), per token and block."""
    width = {"h": arch.hidden_size, "q": arch.q_dim, "kv": arch.kv_dim, "i": arch.intermediate_size,
             "w": method.bottleneck_width(arch.hidden_size)}
    return {term.what: sum(n * width[dim] for dim, n in term.coefficients) * nbytes for term in saved}


# families whose decoder layers have norms beyond the two pre-norms (a post-norm adds to the residual): their norms
# keep the model's own forward under autocast (kernels/fused_norm.py `_pre_norms`)
POST_NORM_TYPES = {"gemma2", "gemma3", "gemma3_text", "olmo2", "cohere", "cohere2"}


def saved_under_bf16_autocast(arch: Architecture, cfg: RunConfig, attention_bf16: bool) -> dict[str, int]:
    """What a block keeps under bf16 autocast with frozen bases stored in bf16 (kernels/frozen_bf16.py), measured
    tensor by tensor with saved_tensors_hooks: the residual stream stays fp32, the linears' outputs are bf16, and so
    are the fused norms' outputs where only linears read them. A linear keeps its input only where a weight trains on
    it (its own, or an adapter's A): a bf16 input is kept once for all its readers, while under autocast each reader
    of an fp32 input (a post-norm family's normed inputs) keeps its own bf16 cast. Dropout runs in the
    input's dtype and CPU dropout keeps its scaled noise in that dtype."""
    h, q, kv, i = arch.hidden_size, arch.q_dim, arch.kv_dim, arch.intermediate_size
    method = cfg.method
    terms_of = method.declaration.memory
    weights_train, low_rank = terms_of.linear_weights_train, terms_of.low_rank
    dropout = low_rank and method.dropout > 0
    lse = arch.num_heads * SDPA_LSE_BYTES
    terms = {"norm inputs 2h (fp32)": 2 * h * 4, "gate, silu, up 3i (bf16)": 3 * i * 2}
    if terms_of.virtual:  # transformers' SDPA: k, v repeated to every head, cast to bf16
        terms["q, k and v repeated to every query head, attention out (bf16)"] = 4 * q * 2 + lse
    elif attention_bf16:
        terms["q, k, v, attention out (bf16 attention)"] = (2 * q + 2 * kv) * 2 + lse
    else:  # upcast: the fp32 q, k, v rotary gave, SDPA's fp32 output (cast to bf16 after it, not kept)
        terms["q, k, v, attention out (fp32 attention)"] = (2 * q + 2 * kv) * 4 + lse
    # the fused norms write the normed inputs in bf16 once (kernels/fused_norm.py) where only linears read them
    norm_emits_bf16 = arch.model_type not in POST_NORM_TYPES
    normed = 2 if norm_emits_bf16 else 4
    # (width, input bytes, readers): q/k/v, o, gate + up, down
    sites = ((h, normed, 3), (q, 2, 1), (h, normed, 2), (i, 2, 1))
    if dropout:
        terms["dropped inputs, noise, A's bf16 inputs"] = sum(n * w * (b + 2) for w, b, n in sites)
    elif weights_train or low_rank:
        terms["linear inputs in bf16 (a cast per reader of an fp32 input)"] = sum((n if b == 4 else 1) * w * 2
                                                                                for w, b, n in sites)
    if weights_train and not norm_emits_bf16:  # the model's own norm keeps its normalised input
        terms["normalised norm inputs 2h (fp32)"] = 2 * h * 4
    if low_rank:
        terms["low-rank A·x, 7 targets"] = 7 * method.r * 2
    if terms_of.dropout_noise_only and method.dropout > 0:
        terms["dropout noise of each target's input"] = sum(n * w * b for w, b, n in sites)
    terms.update(method_saved(terms_of.saved_bf16, arch, method, 2))
    return terms
