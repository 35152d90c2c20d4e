"""Text generation with the tokenizer's chat template."""

from __future__ import annotations

import torch

from tunesmith.data.chat import ensure_chat_template, render


@torch.no_grad()
def generate_chat(model, tokenizer, messages: list[dict], max_new_tokens: int = 128, temperature: float = 0.0,
                  top_p: float = 1.0, virtual=None) -> str:
    """The model's answer to the chat `messages`. `virtual`: the module that holds a virtual-token method's tokens
    (a run context's `virtual(model)`; infer/adapters.py `adapter_context` for a loaded adapter), or None."""
    ensure_chat_template(tokenizer)
    text = render(tokenizer, messages, add_generation_prompt=True)
    enc = tokenizer(text, add_special_tokens=False, return_tensors="pt")
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    kwargs = {"do_sample": temperature > 0, "max_new_tokens": max_new_tokens, "use_cache": True,
              "pad_token_id": tokenizer.pad_token_id, "eos_token_id": tokenizer.eos_token_id}
    if temperature > 0:
        kwargs.update(temperature=temperature, top_p=top_p)
    else:
        kwargs.update(temperature=None, top_p=None, top_k=None)
    ids, mask = enc["input_ids"].to(device), enc["attention_mask"].to(device)
    if virtual is not None:  # generate continues from a cache holding the virtual positions; ids stand in for them
        n, kwargs["past_key_values"] = virtual.generation_cache(model, ids.shape[0])
        ids = torch.cat([ids.new_full((ids.shape[0], n), tokenizer.pad_token_id or 0), ids], dim=1)
        mask = torch.ones_like(ids)
    out = model.generate(input_ids=ids, attention_mask=mask, **kwargs)
    if was_training:
        model.train()
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()
