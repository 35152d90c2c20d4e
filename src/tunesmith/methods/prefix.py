"""Prefix tuning (Li & Liang, 2021) and P-tuning v2 (Liu et al., 2022): N trainable key/value pairs prepended to
the attention of every layer; the base stays frozen.

`prefix` trains them through an MLP reparameterisation, `ptuning-v2` directly; either way what is saved is the
prefix itself, so a saved adapter loads as direct parameters (PtuningV2Settings). The prefixes go into a
transformers DynamicCache, one `update` per layer, which the decoder then continues from: real tokens sit at
positions N.. as in generation. Keys/values have the base's key/value width (grouped-query attention included).

PEFT's format: peft_type PREFIX_TUNING, one tensor `prompt_embeddings` of shape (N, num_layers * 2 * kv_dim), each
row laid out as [layer 0 key, layer 0 value, layer 1 key, ...], each key/value as (kv_heads, head_dim); the config's
token_dim is kv_dim and num_attention_heads the number of key/value heads (PEFT rewrites them so for GQA).
"""

from __future__ import annotations

import torch
from torch import nn

from tunesmith.config.methods import PrefixSettings, PtuningV2Settings
from tunesmith.errors import ModelError
from tunesmith.kernels.attention_mask import attention_mask_for
from tunesmith.methods.base import check_and_copy, freeze_all, read_adapter, write_adapter
from tunesmith.methods.prompt import (SUBMODULE, compute_dtype, disabled, virtual_tokens,  # noqa: F401  (the interface)
                                      with_virtual_columns)

merge = unload = None  # PrefixSettings.declaration says why not


def claims(config: dict) -> bool:
    return config.get("peft_type") == "PREFIX_TUNING"


def kv_shape(model) -> tuple[int, int, int]:
    """(layers, key/value heads, head dim) of the decoder's attention."""
    config = model.config.get_text_config(decoder=True)
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return config.num_hidden_layers, getattr(config, "num_key_value_heads", None) or heads, head_dim


class KVPrefix(nn.Module):
    """The virtual tokens of both methods (what `virtual_tokens(model)` returns); subclasses say where the flat prefix
    comes from."""

    def __init__(self, layers: int, kv_heads: int, head_dim: int):
        super().__init__()
        self.layers, self.kv_heads, self.head_dim = layers, kv_heads, head_dim

    def flat(self) -> torch.Tensor:
        """(N, layers * 2 * kv_dim) in PEFT's layout."""
        raise NotImplementedError

    def cache(self, model, batch_size: int):
        from transformers import DynamicCache

        n = self.num_virtual_tokens
        kv = self.flat().to(compute_dtype(model)).view(n, 2 * self.layers, self.kv_heads, self.head_dim)
        kv = kv.permute(1, 2, 0, 3).unsqueeze(1).expand(-1, batch_size, -1, -1, -1)
        cache = DynamicCache(config=model.config)
        for layer in range(self.layers):
            cache.update(kv[2 * layer], kv[2 * layer + 1], layer)
        return cache

    def hidden_states(self, model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        n = self.num_virtual_tokens
        mask = with_virtual_columns(batch["attention_mask"], n)
        out = model.get_decoder()(input_ids=batch["input_ids"], position_ids=batch["position_ids"] + n,
                                  attention_mask=attention_mask_for(model, mask, compute_dtype(model)),
                                  past_key_values=self.cache(model, batch["input_ids"].shape[0]), use_cache=True)
        return out.last_hidden_state

    @torch.no_grad()
    def generation_cache(self, model, batch_size: int):
        return self.num_virtual_tokens, self.cache(model, batch_size)


class DirectPrefix(KVPrefix):
    def __init__(self, prefix: torch.Tensor, layers: int, kv_heads: int, head_dim: int):
        super().__init__(layers, kv_heads, head_dim)
        self.prefix = nn.Parameter(prefix.detach().float().clone())

    @property
    def num_virtual_tokens(self) -> int:
        return self.prefix.shape[0]

    def flat(self) -> torch.Tensor:
        return self.prefix


class ProjectedPrefix(KVPrefix):
    """Li & Liang's reparameterisation: prefix = MLP(embedding), trained jointly, folded into `flat()` on save."""

    def __init__(self, n: int, hidden: int, projection_hidden: int, layers: int, kv_heads: int, head_dim: int,
                 device=None):
        super().__init__(layers, kv_heads, head_dim)
        self.embedding = nn.Parameter(torch.randn(n, hidden, device=device))
        self.mlp = nn.Sequential(nn.Linear(hidden, projection_hidden, device=device), nn.Tanh(),
                                 nn.Linear(projection_hidden, layers * 2 * kv_heads * head_dim, device=device))

    @property
    def num_virtual_tokens(self) -> int:
        return self.embedding.shape[0]

    def flat(self) -> torch.Tensor:
        return self.mlp(self.embedding)


@torch.no_grad()
def activation_prefix(model, n: int) -> torch.Tensor:
    """The keys/values the frozen model itself computes for n random vocabulary tokens, flattened: a prefix that
    starts out looking like real context rather than noise (Li & Liang's initialisation from real activations)."""
    from transformers import DynamicCache

    weight = model.get_input_embeddings().weight
    ids = torch.randint(0, weight.shape[0], (1, n), device=weight.device)
    cache = DynamicCache(config=model.config)
    # frozen linears loaded in bf16 beside fp32 embeddings (model.dtype auto under train.bf16) compute as the run's
    # bf16 autocast will; a model in one dtype computes as it is
    mixed = any(m.weight.dtype != weight.dtype for m in model.modules() if isinstance(m, nn.Linear))
    with torch.autocast(weight.device.type, dtype=torch.bfloat16, enabled=mixed):
        model.get_decoder()(input_ids=ids, past_key_values=cache, use_cache=True)
    kv = torch.stack([torch.stack([layer.keys[0], layer.values[0]]) for layer in cache.layers])
    return kv.permute(3, 0, 1, 2, 4).reshape(n, -1).float()


def apply(model: nn.Module, settings: PrefixSettings | PtuningV2Settings) -> KVPrefix:
    """Freeze the model and attach the trainable prefix (through the MLP for `prefix` with projection)."""
    freeze_all(model)
    shape = kv_shape(model)
    n = settings.num_virtual_tokens
    if settings.name == "prefix" and settings.projection:
        weight = model.get_input_embeddings().weight
        setattr(model, SUBMODULE, ProjectedPrefix(n, weight.shape[1], settings.projection_hidden, *shape,
                                                  device=weight.device))
    else:
        setattr(model, SUBMODULE, DirectPrefix(activation_prefix(model, n), *shape))
    return virtual_tokens(model)


def peft_config(model, settings, base_model: str) -> dict:
    layers, kv_heads, head_dim = kv_shape(model)
    return {
        "peft_type": "PREFIX_TUNING",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "num_virtual_tokens": settings.num_virtual_tokens,
        "token_dim": kv_heads * head_dim,
        "num_attention_heads": kv_heads,
        "num_layers": layers,
        "num_transformer_submodules": 1,
        "encoder_hidden_size": kv_heads * head_dim,
        "prefix_projection": False,
        "init_weights": None,
        "inference_mode": True,
        "modules_to_save": None,
        "revision": None,
    }


def save(model: nn.Module, settings: PrefixSettings | PtuningV2Settings, folder, base_model: str) -> None:
    with torch.no_grad():
        prefix = virtual_tokens(model).flat()
    write_adapter(folder, peft_config(model, settings, base_model), {"prompt_embeddings": prefix})


def load(model: nn.Module, folder) -> PtuningV2Settings:
    """Load a prefix adapter (ours or peft's, with or without projection: both save the projected prefix) as
    direct parameters; its config and tensor are checked against the base's layers and key/value width."""
    config, tensors = read_adapter(folder)
    if not claims(config):
        raise ModelError(f"{folder}: adapter type is {config.get('peft_type')!r}, not PREFIX_TUNING")
    if config.get("num_transformer_submodules", 1) != 1:
        raise ModelError(f"{folder}/adapter_config.json: num_transformer_submodules "
                         f"{config['num_transformer_submodules']} is for encoder-decoder models; only 1 is supported")
    layers, kv_heads, head_dim = kv_shape(model)
    saved = (config.get("num_layers"), config.get("token_dim"))
    if saved != (layers, kv_heads * head_dim):
        raise ModelError(f"{folder}: this adapter does not fit the base model (made for a different base?)\n"
                         f"  - adapter has num_layers {saved[0]} and key/value width (token_dim) {saved[1]}; "
                         f"model has {layers} and {kv_heads * head_dim} ({kv_heads} heads × {head_dim})")
    settings = PtuningV2Settings(num_virtual_tokens=config["num_virtual_tokens"])
    width = layers * 2 * kv_heads * head_dim
    freeze_all(model)
    device = model.get_input_embeddings().weight.device
    setattr(model, SUBMODULE, DirectPrefix(torch.zeros(settings.num_virtual_tokens, width, device=device), layers,
                                           kv_heads, head_dim))
    check_and_copy(folder, {"prompt_embeddings": virtual_tokens(model).prefix}, tensors)
    return settings
