"""Build, once, a model with exactly Llama-3.2-1B's shape and random weights, for bench/real_size.py.

The shape is meta-llama/Llama-3.2-1B's config.json (as published, and as transformers' LlamaConfig reads it): hidden
2048, 16 layers, 32 attention heads of 64, 8 key/value heads, intermediate 8192, vocabulary 128256, tied embeddings,
RMSNorm eps 1e-5, rope_theta 500000 with llama3 rope scaling (factor 32, low_freq_factor 1, high_freq_factor 4,
original_max_position_embeddings 8192), max_position_embeddings 131072: 1,235,814,400 parameters, checked below.
Weights are random (normal, std 0.02, seed 0; norms 1), saved as bf16 safetensors like the published checkpoint.
The tokenizer is SmolLM2-135M-Instruct's (49,152 tokens, its chat template) from tunesmith's builtin cache: its ids
all fit the 128,256-row embedding (rows above 49,151 are never looked up); bos/eos/pad are the tokenizer's ids.

    python bench/make_llama_1b.py        # prints the folder; does nothing when it exists

The folder is ~/.cache/tunesmith/bench/llama-3.2-1b-shape (TUNESMITH_CACHE moves ~/.cache/tunesmith), written to
a temporary folder and renamed into place (atomic).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

PARAMETERS = 1_235_814_400
SHAPE = dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
             num_key_value_heads=8, head_dim=64, vocab_size=128256, tie_word_embeddings=True, rms_norm_eps=1e-5,
             max_position_embeddings=131072, hidden_act="silu", attention_bias=False, mlp_bias=False,
             rope_theta=500000.0, rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                                                "high_freq_factor": 4.0, "original_max_position_embeddings": 8192})


def folder() -> Path:
    root = os.environ.get("TUNESMITH_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "tunesmith")
    return Path(root) / "bench" / "llama-3.2-1b-shape"


def build(dest: Path) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from tunesmith.atomic import atomic_folder
    from tunesmith.models import load_tokenizer

    tokenizer = load_tokenizer("builtin:smollm2-135m-instruct")
    config = LlamaConfig(**SHAPE, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, initializer_range=0.02)
    torch.manual_seed(0)
    model = LlamaForCausalLM._from_config(config, dtype=torch.bfloat16)
    count = sum(p.numel() for p in model.parameters())
    if count != PARAMETERS:
        raise SystemExit(f"built {count:,} parameters, Llama-3.2-1B has {PARAMETERS:,}")
    rope = model.config.rope_parameters
    assert rope["rope_type"] == "llama3" and rope["factor"] == 32.0 and rope["rope_theta"] == 500000.0, rope
    assert model.lm_head.weight is model.model.embed_tokens.weight
    with atomic_folder(dest) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)


def main() -> None:
    dest = folder()
    if not (dest / "config.json").is_file():
        dest.parent.mkdir(parents=True, exist_ok=True)
        build(dest)
    print(dest)


if __name__ == "__main__":
    sys.exit(main())
