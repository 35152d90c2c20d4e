"""G completions per prompt in one batched, cached decode: each prompt is computed once (a prefill of all but its
last token), its key/value cache repeated G times along the batch, and `generate` continues all B·G rows from there,
so the prompt's forward pass is paid once per prompt instead of once per completion.

Virtual-token methods (prompt, prefix, P-tuning) bring a cache of their own (objectives/ppo.py's `sample`): their
prompts are repeated G times instead.
"""

from __future__ import annotations

import torch

from tunesmith.context import RunContext
from tunesmith.objectives.ppo import PromptExample, sample


def _left_padded(prompts: list[PromptExample], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(p.ids)
        mask[i, width - len(p):] = 1
    return ids, mask


@torch.no_grad()
def sample_groups(model, tokenizer, prompts: list[PromptExample], group: int, max_new_tokens: int, ctx: RunContext,
                  temperature: float = 1.0, top_k: int = 0, greedy: bool = False) -> list[list[int]]:
    """`group` completions of each prompt, group-major (prompt 0's first), each through its first end-of-turn token
    (or max_new_tokens tokens)."""
    from types import SimpleNamespace

    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    if ctx.virtual(model) is not None or min(len(p) for p in prompts) < 2:
        repeated = [p for p in prompts for _ in range(group)]
        return sample(model, tokenizer, repeated, SimpleNamespace(max_new_tokens=max_new_tokens,
                                                                  temperature=temperature, top_k=top_k), ctx, greedy)
    device = model.get_input_embeddings().weight.device
    ids, mask = (t.to(device) for t in _left_padded(prompts, pad))
    positions = (mask.cumsum(-1) - 1).clamp(min=0)  # as generate numbers left-padded rows
    prefill = model.get_decoder()(input_ids=ids[:, :-1], attention_mask=mask[:, :-1], position_ids=positions[:, :-1],
                                  use_cache=True)
    cache = prefill.past_key_values
    cache.batch_repeat_interleave(group)
    kwargs = {"max_new_tokens": max_new_tokens, "use_cache": True, "pad_token_id": pad, "eos_token_id": eos}
    if greedy:
        kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
    else:
        kwargs.update(do_sample=True, temperature=temperature, top_p=1.0, top_k=top_k)
    ids, mask = ids.repeat_interleave(group, 0), mask.repeat_interleave(group, 0)
    out = model.generate(input_ids=ids, attention_mask=mask, past_key_values=cache, **kwargs)[:, ids.shape[1]:]
    return [row[: row.index(eos) + 1] if eos in row else row for row in out.tolist()]
