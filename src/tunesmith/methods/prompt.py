"""Prompt tuning (Lester et al., 2021): N trainable embeddings prepended to every input's token embeddings.

The base stays frozen; the module `virtual_tokens(model)` returns runs the decoder with the virtual tokens at
positions 0..N-1 and the real tokens from N on (as PEFT does and as generation sees them). Packed rows behave as if
every example had its own copy of the prompt. Saved in PEFT's format: peft_type PROMPT_TUNING, one tensor
`prompt_embeddings` (N, hidden).

The helpers for masks, positions and dtypes are shared with prefix.py.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn

from tunesmith.config.methods import PromptSettings
from tunesmith.errors import ModelError
from tunesmith.kernels.attention_mask import attention_mask_for
from tunesmith.methods.base import check_and_copy, freeze_all, read_adapter, write_adapter

merge = unload = None  # PromptSettings.declaration says why not
PEFT_INIT = {"random": "RANDOM", "vocab": "SAMPLE_VOCAB", "text": "TEXT"}
# The virtual tokens' module is a submodule of the model under this name, so that the optimizer, checkpoints,
# parameter counts, `.to(device)` and the DDP/FSDP wrapper see its parameters. Objectives and generation reach it
# only through `virtual_tokens(model)`, the hook a run context carries (context.py).
SUBMODULE = "virtual_tokens"


def virtual_tokens(model: nn.Module) -> nn.Module | None:
    """The module running `model`'s decoder with its virtual tokens (prompt tuning's, or prefix.py's), or None: none
    attached, or switched off by `disabled`."""
    return getattr(model, SUBMODULE, None)


def claims(config: dict) -> bool:
    return config.get("peft_type") == "PROMPT_TUNING"


def compute_dtype(model) -> torch.dtype:
    """The dtype the decoder's activations have right now (autocast's, else the weights')."""
    device = model.get_input_embeddings().weight.device
    if torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    return model.get_input_embeddings().weight.dtype


def with_virtual_columns(mask: torch.Tensor, n: int) -> torch.Tensor:
    """A batch mask widened so every real token also attends to n virtual positions placed before it.

    (B, L) padding mask → (B, n+L); (B, 1, L, L) bool mask → (B, 1, L, n+L).
    """
    if mask.ndim == 2:
        return torch.cat([mask.new_ones(mask.shape[0], n), mask], dim=1)
    return torch.cat([mask.new_ones(*mask.shape[:-1], n), mask], dim=-1)


def with_virtual_rows(mask: torch.Tensor, n: int) -> torch.Tensor:
    """Like with_virtual_columns, plus n query rows for the virtual tokens themselves (causal among them only)."""
    if mask.ndim == 2:
        return with_virtual_columns(mask, n)
    b, _, length, _ = mask.shape
    virtual = torch.ones(n, n, dtype=torch.bool, device=mask.device).tril()
    top = torch.cat([virtual, virtual.new_zeros(n, length)], dim=1).expand(b, 1, n, n + length)
    return torch.cat([top, with_virtual_columns(mask, n)], dim=2)


class PromptEmbeddings(nn.Module):
    """Prompt tuning's virtual tokens: what `virtual_tokens(model)` returns."""

    def __init__(self, init: torch.Tensor):
        super().__init__()
        self.embeddings = nn.Parameter(init.detach().float().clone())

    @property
    def num_virtual_tokens(self) -> int:
        return self.embeddings.shape[0]

    def _prompt(self, embed_dtype: torch.dtype, batch_size: int) -> torch.Tensor:
        return self.embeddings.to(embed_dtype).unsqueeze(0).expand(batch_size, -1, -1)

    def hidden_states(self, model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        ids, n = batch["input_ids"], self.num_virtual_tokens
        tokens = model.get_input_embeddings()(ids)
        embeds = torch.cat([self._prompt(tokens.dtype, ids.shape[0]), tokens], dim=1)
        virtual_positions = torch.arange(n, device=ids.device).expand(ids.shape[0], n)
        positions = torch.cat([virtual_positions, batch["position_ids"] + n], dim=1)
        mask = with_virtual_rows(batch["attention_mask"], n)
        out = model.get_decoder()(inputs_embeds=embeds, position_ids=positions, use_cache=False,
                                  attention_mask=attention_mask_for(model, mask, compute_dtype(model)))
        return out.last_hidden_state[:, n:]

    @torch.no_grad()
    def generation_cache(self, model, batch_size: int):
        """The keys/values of the virtual tokens at every layer, as a cache `generate` continues from."""
        from transformers import DynamicCache

        n = self.num_virtual_tokens
        cache = DynamicCache(config=model.config)
        weight = model.get_input_embeddings().weight
        positions = torch.arange(n, device=weight.device).expand(batch_size, n)
        model.get_decoder()(inputs_embeds=self._prompt(weight.dtype, batch_size), position_ids=positions,
                            past_key_values=cache, use_cache=True)
        return n, cache


def initial_embeddings(model, settings: PromptSettings, tokenizer=None) -> torch.Tensor:
    table = model.get_input_embeddings().weight.detach()
    n = settings.num_virtual_tokens
    if settings.init == "random":  # at the scale of the real embeddings, not N(0, 1) as PEFT's RANDOM
        return torch.randn(n, table.shape[1], device=table.device) * table.float().std()
    if settings.init == "vocab":
        return table[torch.randint(0, table.shape[0], (n,), device=table.device)]
    if tokenizer is None:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(model.name_or_path)
    ids = tokenizer(settings.init_text, add_special_tokens=False)["input_ids"]
    if not ids:
        raise ModelError(f"method.init_text: {settings.init_text!r} has no tokens")
    return table[torch.tensor((ids * (n // len(ids) + 1))[:n], device=table.device)]


def apply(model: nn.Module, settings: PromptSettings, tokenizer=None) -> PromptEmbeddings:
    """Freeze the model and attach the trainable prompt; `tokenizer` (for init: text) defaults to the model's."""
    freeze_all(model)
    setattr(model, SUBMODULE, PromptEmbeddings(initial_embeddings(model, settings, tokenizer)))
    return virtual_tokens(model)


@contextmanager
def disabled(model: nn.Module):
    """Run the bare base model inside the block (no virtual tokens), then put them back in the same place."""
    virtual = virtual_tokens(model)
    try:
        setattr(model, SUBMODULE, None)
        yield model
    finally:
        setattr(model, SUBMODULE, virtual)


def peft_config(model, settings: PromptSettings, base_model: str) -> dict:
    config = model.config.get_text_config(decoder=True)
    return {
        "peft_type": "PROMPT_TUNING",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "num_virtual_tokens": settings.num_virtual_tokens,
        "token_dim": config.hidden_size,
        "num_transformer_submodules": 1,
        "num_attention_heads": config.num_attention_heads,
        "num_layers": config.num_hidden_layers,
        "prompt_tuning_init": PEFT_INIT[settings.init],
        "prompt_tuning_init_text": settings.init_text if settings.init == "text" else None,
        "tokenizer_name_or_path": base_model if settings.init == "text" else None,
        "tokenizer_kwargs": None,
        "inference_mode": True,
        "modules_to_save": None,
        "revision": None,
    }


def save(model: nn.Module, settings: PromptSettings, folder, base_model: str) -> None:
    write_adapter(folder, peft_config(model, settings, base_model),
                  {"prompt_embeddings": virtual_tokens(model).embeddings})


def load(model: nn.Module, folder) -> PromptSettings:
    """Load a prompt-tuning adapter (ours or peft's) into `model`; shapes are checked against the base."""
    config, tensors = read_adapter(folder)
    if not claims(config):
        raise ModelError(f"{folder}: adapter type is {config.get('peft_type')!r}, not PROMPT_TUNING")
    if config.get("num_transformer_submodules", 1) != 1:
        raise ModelError(f"{folder}/adapter_config.json: num_transformer_submodules "
                         f"{config['num_transformer_submodules']} is for encoder-decoder models; only 1 is supported")
    init = {v: k for k, v in PEFT_INIT.items()}.get(config.get("prompt_tuning_init"), "random")
    text = config.get("prompt_tuning_init_text") if init == "text" else None
    settings = PromptSettings(num_virtual_tokens=config["num_virtual_tokens"],
                              init="random" if init == "text" and not text else init, init_text=text)
    hidden = model.get_input_embeddings().weight.shape[1]
    freeze_all(model)
    setattr(model, SUBMODULE, PromptEmbeddings(torch.zeros(settings.num_virtual_tokens, hidden,
                                                           device=model.get_input_embeddings().weight.device)))
    check_and_copy(folder, {"prompt_embeddings": virtual_tokens(model).embeddings}, tensors)
    return settings
