"""Which llama.cpp architecture a transformers model is, and its hyperparameters under the gguf package's key names.

The architecture is the gguf package's own (`gguf.MODEL_ARCH_NAMES`) of the config's model_type; the few HF model
types llama.cpp's converter files under another architecture are named in ARCH_ALIASES. Everything else is read from
the config by rule: sizes, norm epsilons, head sizes, softcapping, sliding windows and rope scaling.
"""

from __future__ import annotations

from tunesmith.errors import ModelError

# HF model types llama.cpp's converter (convert_hf_to_gguf.py's registrations) writes under another architecture
ARCH_ALIASES = {"mistral": "llama", "gemma3_text": "gemma3"}
# llama.cpp's architectures whose rotary embedding turns pairs of adjacent values (llama_model_rope_type's
# LLAMA_ROPE_TYPE_NORM); HF turns first and second halves, so these get their q/k rows interleaved
NORM_ROPE_ARCHS = {"llama", "llada", "llama4", "deci", "baichuan", "starcoder", "internlm2", "minicpm", "xverse",
                   "command-r", "cohere2", "olmo", "arctic", "deepseek", "deepseek2", "plm", "chatglm", "granite",
                   "granitemoe", "granitehybrid", "chameleon", "bailingmoe", "smollm3", "arcee", "ernie4_5",
                   "ernie4_5-moe", "mistral3"}
# llama.cpp scales attention by 1/sqrt(head_dim) for these, except at the layer count it takes for the 27B model,
# where it uses 1/sqrt(hidden / heads) (src/models/gemma2.cpp, gemma3.cpp)
WIDE_SCALE_LAYERS = {"gemma2": 46, "gemma3": 62}
# llama.cpp's SmolLM3 leaves out rotary embeddings on every 4th layer (src/models/smollm3.cpp)
SMOLLM3_NO_ROPE_STEP = 4


def gguf_arch(config):
    """(gguf.MODEL_ARCH, name) for the model, or a ModelError naming its model_type."""
    from gguf import MODEL_ARCH_NAMES

    by_name = {name: arch for arch, name in MODEL_ARCH_NAMES.items()}
    name = ARCH_ALIASES.get(config.model_type, config.model_type)
    if name not in by_name:
        raise ModelError(f"GGUF export: llama.cpp has no architecture for model_type {config.model_type!r} (the "
                         "gguf package knows none of that name). Use --format hf")
    return by_name[name], name


def head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def llamacpp_attention_scale(config, arch_name: str) -> float:
    if WIDE_SCALE_LAYERS.get(arch_name) == config.num_hidden_layers:
        return (config.hidden_size / config.num_attention_heads) ** -0.5
    return head_dim(config) ** -0.5


def _rope(config) -> tuple[dict, dict]:
    """(the full-attention layers' rope parameters, the sliding layers') from rope_parameters (or older keys)."""
    rope = dict(getattr(config, "rope_parameters", None) or {})
    if "full_attention" in rope:
        return rope["full_attention"] or {}, rope.get("sliding_attention") or {}
    rope.setdefault("rope_theta", getattr(config, "rope_theta", 10000.0))
    scaling = getattr(config, "rope_scaling", None) or {}
    for key, value in scaling.items():
        rope.setdefault(key, value)
    return rope, {}


def rope_type(config) -> str:
    rope, _ = _rope(config)
    return rope.get("rope_type", rope.get("type", "default"))


# config fields that scale what a model computes (Granite's multipliers, Cohere's logit scale) and that this export
# does not write: a model with any of them away from 1 is refused rather than written to compute something else
UNWRITTEN_SCALES = ("embedding_multiplier", "residual_multiplier", "attention_multiplier", "logits_scaling",
                    "logit_scale")


def check_supported(config, arch_name: str) -> None:
    scaled = {key: getattr(config, key) for key in UNWRITTEN_SCALES
              if isinstance(getattr(config, key, None), (int, float)) and getattr(config, key) != 1}
    if scaled:
        raise ModelError(f"GGUF export: this {config.model_type} model scales its computation by "
                         + ", ".join(f"{k}={v}" for k, v in scaled.items())
                         + ", which the GGUF export does not write (llama.cpp would compute something else). "
                         "Use --format hf")
    kind = rope_type(config)
    if kind not in ("default", "llama3", "linear", "yarn"):
        raise ModelError(f"GGUF export: rope_type {kind!r} of this {config.model_type} model is not written; "
                         "default, llama3, linear and yarn are. Use --format hf")
    if arch_name == "smollm3":
        layers = range(config.num_hidden_layers)
        wanted = [int((i + 1) % SMOLLM3_NO_ROPE_STEP != 0) for i in layers]
        if list(getattr(config, "no_rope_layers", wanted)) != wanted:
            raise ModelError(f"GGUF export: llama.cpp's smollm3 leaves out rope on every {SMOLLM3_NO_ROPE_STEP}th "
                             f"layer; this model's no_rope_layers is {config.no_rope_layers}. Use --format hf")


def llama3_rope_factors(config):
    """Per-frequency divisors of the plain rotary frequencies that give `llama3` rope scaling: llama.cpp's
    rope_freqs tensor. Computed from transformers' own rope functions (plain over scaled inverse frequencies)."""
    import torch
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](config, "cpu")
    base = _rope(config)[0]["rope_theta"]
    dim = int(head_dim(config) * getattr(config, "partial_rotary_factor", 1.0))
    plain = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    return (plain / scaled.float()).numpy().astype("float32")


def write_hparams(writer, config, arch_name: str) -> None:
    """The hyperparameters llama.cpp reads, under the gguf package's key names (GGUFWriter's add_*)."""
    check_supported(config, arch_name)
    hidden = config.hidden_size
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(hidden)
    writer.add_block_count(config.num_hidden_layers)
    ffn = getattr(config, "intermediate_size", None) or getattr(config, "n_inner", None) or 4 * hidden
    writer.add_feed_forward_length(ffn)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(getattr(config, "num_key_value_heads", None) or config.num_attention_heads)
    dim = head_dim(config)
    if dim * config.num_attention_heads != hidden or getattr(config, "head_dim", None):
        writer.add_key_length(dim)
        writer.add_value_length(dim)
    if getattr(config, "rms_norm_eps", None) is not None:
        writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    for key in ("layer_norm_eps", "layer_norm_epsilon"):
        if getattr(config, key, None) is not None:
            writer.add_layer_norm_eps(float(getattr(config, key)))
    if getattr(config, "attn_logit_softcapping", None):
        writer.add_attn_logit_softcapping(float(config.attn_logit_softcapping))
    if getattr(config, "final_logit_softcapping", None):
        writer.add_final_logit_softcapping(float(config.final_logit_softcapping))
    _write_sliding_window(writer, config)
    if arch_name != "gpt2":
        _write_rope(writer, config, dim)


def _write_sliding_window(writer, config) -> None:
    window = getattr(config, "sliding_window", None)
    if not window or getattr(config, "use_sliding_window", True) is False:
        return
    writer.add_sliding_window(int(window))
    layer_types = getattr(config, "layer_types", None)
    if layer_types:
        writer.add_sliding_window_pattern([t == "sliding_attention" for t in layer_types])


def _write_rope(writer, config, dim: int) -> None:
    from gguf import RopeScalingType

    rope, sliding = _rope(config)
    writer.add_rope_dimension_count(int(dim * getattr(config, "partial_rotary_factor", 1.0)))
    writer.add_rope_freq_base(float(rope.get("rope_theta", 10000.0)))
    if sliding.get("rope_theta") is not None:
        writer.add_rope_freq_base_swa(float(sliding["rope_theta"]))
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind == "linear":
        writer.add_rope_scaling_type(RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(rope["factor"]))
    elif kind == "yarn":
        writer.add_rope_scaling_type(RopeScalingType.YARN)
        writer.add_rope_scaling_factor(float(rope["factor"]))
        original = rope.get("original_max_position_embeddings") or config.max_position_embeddings
        writer.add_rope_scaling_orig_ctx_len(int(original))
        for key, add in (("beta_fast", writer.add_rope_scaling_yarn_beta_fast),
                         ("beta_slow", writer.add_rope_scaling_yarn_beta_slow)):
            if rope.get(key) is not None:
                add(float(rope[key]))
        if rope.get("attention_factor") is not None:
            writer.add_rope_scaling_yarn_attn_factor(float(rope["attention_factor"]))
