"""The shape of a decoder-only model, read from its config: a local HF folder, a cached hub id, the builtin, or a
size with an architecture name (`llama:7b`) from a table of published configs.

Every entry of the table is copied from the `config.json` of the hub repository named in its `source`; the
parameter count each gives is checked against the model card's figure in tests/test_plan.py.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from tunesmith.errors import ModelError

# model_type values whose decoder is the Llama layout: model.layers.N.self_attn.{q,k,v,o}_proj,
# model.layers.N.mlp.{gate,up,down}_proj, two RMSNorms per block, a final norm, embed_tokens and lm_head.
LLAMA_LAYOUT = ("llama", "mistral", "qwen2", "qwen3")
STORED_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}  # config.json's dtype: what save_pretrained wrote


@dataclass(frozen=True)
class Architecture:
    name: str
    model_type: str
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    tied_embeddings: bool
    attention_bias: bool = False  # Llama's flag: q, k, v and o all carry a bias
    qkv_bias: bool = False        # Qwen2's layout: q, k and v carry a bias, o does not
    mlp_bias: bool = False
    qk_norm: bool = False         # Qwen3: an RMSNorm over each head's query and key (head_dim weights each)
    source: str = ""
    checkpoint_bytes: int = 4     # bytes a weight takes in the checkpoint file (config.json's dtype; the table: fp32)

    @property
    def kv_dim(self) -> int:
        return self.num_kv_heads * self.head_dim

    @property
    def q_dim(self) -> int:
        return self.num_heads * self.head_dim


def _entry(name, model_type, hidden, intermediate, layers, heads, kv_heads, vocab, tied, source, **extra):
    return Architecture(name, model_type, hidden, intermediate, layers, heads, kv_heads, hidden // heads, vocab, tied,
                        source=source, **extra)


HF = "https://huggingface.co/{}/blob/main/config.json"
PUBLISHED = {a.name: a for a in [
    _entry("llama:7b", "llama", 4096, 11008, 32, 32, 32, 32000, False, HF.format("meta-llama/Llama-2-7b-hf")),
    _entry("llama:13b", "llama", 5120, 13824, 40, 40, 40, 32000, False, HF.format("meta-llama/Llama-2-13b-hf")),
    _entry("llama3:8b", "llama", 4096, 14336, 32, 32, 8, 128256, False, HF.format("meta-llama/Meta-Llama-3-8B")),
    _entry("mistral:7b", "mistral", 4096, 14336, 32, 32, 8, 32000, False, HF.format("mistralai/Mistral-7B-v0.1")),
    _entry("qwen2:0.5b", "qwen2", 896, 4864, 24, 14, 2, 151936, True, HF.format("Qwen/Qwen2-0.5B"), qkv_bias=True),
    _entry("qwen2:1.5b", "qwen2", 1536, 8960, 28, 12, 2, 151936, True, HF.format("Qwen/Qwen2-1.5B"), qkv_bias=True),
    _entry("qwen2:7b", "qwen2", 3584, 18944, 28, 28, 4, 152064, False, HF.format("Qwen/Qwen2-7B"), qkv_bias=True),
    _entry("smollm2:135m", "llama", 576, 1536, 30, 9, 3, 49152, True, HF.format("HuggingFaceTB/SmolLM2-135M")),
    _entry("smollm2:360m", "llama", 960, 2560, 32, 15, 5, 49152, True, HF.format("HuggingFaceTB/SmolLM2-360M")),
    _entry("smollm2:1.7b", "llama", 2048, 8192, 24, 32, 32, 49152, True, HF.format("HuggingFaceTB/SmolLM2-1.7B")),
]}


def from_config(config: dict, name: str, source: str = "") -> Architecture:
    """An Architecture from a transformers config dict (config.json); multimodal configs use their text part."""
    config = config.get("text_config") or config
    model_type = config.get("model_type")
    if model_type not in LLAMA_LAYOUT:
        raise ModelError(f"{name}: model_type {model_type!r} is not one the planner knows the layout of; known: "
                         f"{', '.join(LLAMA_LAYOUT)}")
    try:
        heads = config["num_attention_heads"]
        hidden = config["hidden_size"]
        return Architecture(
            name=name, model_type=model_type, hidden_size=hidden, intermediate_size=config["intermediate_size"],
            num_layers=config["num_hidden_layers"], num_heads=heads,
            num_kv_heads=config.get("num_key_value_heads") or heads,
            head_dim=config.get("head_dim") or hidden // heads, vocab_size=config["vocab_size"],
            tied_embeddings=bool(config.get("tie_word_embeddings", False)),  # False: these configs' default
            attention_bias=bool(config.get("attention_bias", False)) and model_type != "qwen2",
            qkv_bias=model_type == "qwen2", mlp_bias=bool(config.get("mlp_bias", False)),
            qk_norm=model_type == "qwen3", source=source or name,
            checkpoint_bytes=STORED_BYTES.get(config.get("dtype") or config.get("torch_dtype"), 4))
    except KeyError as e:
        raise ModelError(f"{name}: config.json has no {e.args[0]!r}; is it a causal LM's config?") from None


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ModelError(f"{path}: cannot read the model config ({e})") from None


def _known() -> str:
    return ", ".join(PUBLISHED)


def resolve(model: str) -> Architecture:
    """`llama:7b` (the table), `builtin:NAME`, a folder holding config.json, or a hub id in the local cache."""
    if model in PUBLISHED:
        return PUBLISHED[model]
    if model.startswith("builtin:"):
        from tunesmith.models import builtin_folder

        folder = builtin_folder(model.removeprefix("builtin:"))
        return from_config(_read_json(folder / "config.json"), model, f"{folder}/config.json")
    path = Path(model).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelError(f"--model {model}: folder holds no config.json")
        return from_config(_read_json(path / "config.json"), model, str(path / "config.json"))
    if ":" in model and "/" not in model:
        family = model.split(":", 1)[0]
        sizes = [k for k in PUBLISHED if k.startswith(family + ":")]
        hint = f"sizes of {family}: {', '.join(sizes)}" if sizes else f"known: {_known()}"
        raise ModelError(f"--model {model}: unknown architecture and size; {hint}")
    if model.count("/") == 1:
        try:
            from huggingface_hub import try_to_load_from_cache

            cached = try_to_load_from_cache(model, "config.json")
        except Exception:
            cached = None
        if isinstance(cached, str):
            return from_config(_read_json(Path(cached)), model, cached)
    raise ModelError(f"--model {model}: not a folder with config.json, not a hub id in the local cache, and not a "
                     f"published architecture; known architectures: {_known()}")

