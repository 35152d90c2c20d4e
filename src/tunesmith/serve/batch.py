"""The KV cache of the requests that decode together, one row per request: the rows are left-padded to a common
length, an attention mask hides the padding and each row gets its own position ids, so that row i computes what
request i alone would. The cache is rebuilt only when the membership changes: a request joins with the cache of
its prefill (run alone), or requests leave (then the columns that are padding in every row go too)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _layers(cache) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(layer.keys, layer.values) for layer in cache.layers]


def _cache(layers: list[tuple[torch.Tensor, torch.Tensor]]):
    from transformers import DynamicCache

    return DynamicCache(ddp_cache_data=layers)


def _pad_left(t: torch.Tensor, width: int, dim: int) -> torch.Tensor:
    """`t` left-padded with zeros along `dim` (the sequence dimension: -2 for keys and values, 1 for the mask)."""
    missing = width - t.shape[dim]
    if not missing:
        return t
    pad = [0, 0] * (t.dim() - 1 - dim % t.dim()) + [missing, 0]
    return F.pad(t, pad)


class Batch:
    def __init__(self):
        self.cache = None  # a DynamicCache: per layer (rows, kv heads, width, head dim)
        self.mask: torch.Tensor | None = None  # (rows, width): 1 where a row holds a real token
        self.lengths: list[int] = []  # the real tokens each row holds: its next position id

    def __len__(self) -> int:
        return len(self.lengths)

    @property
    def width(self) -> int:
        return 0 if self.mask is None else self.mask.shape[1]

    def join(self, caches: list) -> None:
        """Append one row per cache (each holding one request's prompt, of batch size 1), in order."""
        blocks = [] if self.cache is None else [(_layers(self.cache), self.mask)]
        for cache in caches:
            layers = _layers(cache)
            blocks.append((layers, torch.ones(1, layers[0][0].shape[-2], dtype=torch.long,
                                              device=layers[0][0].device)))
        width = max(mask.shape[1] for _, mask in blocks)
        layers = [tuple(torch.cat([_pad_left(block[i][part], width, -2) for block, _ in blocks]) for part in (0, 1))
                  for i in range(len(blocks[0][0]))]
        self.mask = torch.cat([_pad_left(mask, width, 1) for _, mask in blocks])
        self.cache = _cache(layers)
        self.lengths += [cache.get_seq_length() for cache in caches]

    def keep(self, rows: list[int]) -> None:
        """Keep only these rows (in this order); the rest leave."""
        if rows == list(range(len(self))):
            return
        if not rows:
            self.cache, self.mask, self.lengths = None, None, []
            return
        index = torch.tensor(rows, device=self.mask.device)
        mask = self.mask.index_select(0, index)
        start = int(mask.any(0).long().argmax())  # the leading columns that are padding in every kept row go
        self.mask = mask[:, start:]
        self.cache = _cache([(k.index_select(0, index)[:, :, start:], v.index_select(0, index)[:, :, start:])
                             for k, v in _layers(self.cache)])
        self.lengths = [self.lengths[i] for i in rows]

    def step(self, model, tokens: list[int]) -> torch.Tensor:
        """Feed one token per row; the next-token logits, one row each (rows, vocab)."""
        device = self.mask.device
        self.mask = torch.cat([self.mask, self.mask.new_ones(len(self), 1)], 1)
        positions = torch.tensor(self.lengths, device=device).unsqueeze(1)
        out = model(input_ids=torch.tensor(tokens, device=device).unsqueeze(1), attention_mask=self.mask,
                    position_ids=positions, past_key_values=self.cache, use_cache=True)
        self.lengths = [n + 1 for n in self.lengths]
        return out.logits[:, -1]
