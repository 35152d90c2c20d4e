"""Perplexity on held-out text: the documents tokenised and concatenated (each ending with EOS), cut into
non-overlapping windows, exp of the mean next-token loss over every predicted token."""

from __future__ import annotations

import math

import torch


@torch.no_grad()
def perplexity(model, tokenizer, texts: list[str], window: int = 512, max_tokens: int | None = None) -> float:
    stream: list[int] = []
    for text in texts:
        stream += tokenizer(text)["input_ids"] + [tokenizer.eos_token_id]
    if max_tokens:
        stream = stream[:max_tokens]
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for start in range(0, len(stream) - 1, window):
        ids = torch.tensor([stream[start:start + window]], device=device)
        if ids.shape[1] < 2:
            break
        logits = model(input_ids=ids).logits[0, :-1].float()
        total += float(torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="sum"))
        count += ids.shape[1] - 1
    model.train(was_training)
    return math.exp(total / count)
