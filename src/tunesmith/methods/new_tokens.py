"""New tokens (model.add_tokens, model.add_special_tokens): the tokenizer grows, and the model's input embedding (and
an untied output head) grows with it. transformers' resize_token_embeddings adds the rows; each new row then starts
as the mean of the existing rows, or of the token embeddings of a text given for it (model.new_token_init_text), so
a new token begins as an average of what the model knows instead of noise.

Which rows then train is methods/trainable_tokens.py's part.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from tunesmith.errors import ConfigError


@dataclass
class Growth:
    """What growing the tokenizer did: the added tokens by id, those the vocabulary already held, the text token ids
    each new row starts from (none: the mean of all the rows), and the tokenizer's length before."""
    added: dict[str, int] = field(default_factory=dict)
    present: list[str] = field(default_factory=list)
    init_ids: dict[int, list[int]] = field(default_factory=dict)
    base_length: int = 0

    def summary(self) -> str:
        parts = [f"added {len(self.added)} ({', '.join(self.added)})"] if self.added else []
        if self.present:
            parts.append(f"already in the vocabulary, not added: {', '.join(self.present)}")
        return "; ".join(parts) or "nothing to add"


def grow_tokenizer(tokenizer, settings) -> Growth:
    """Add `settings.add_tokens` (plain) and `settings.add_special_tokens` to `tokenizer` in place, skipping those its
    vocabulary holds; tokenize each `settings.new_token_init_text` first, with the tokenizer as it was."""
    growth = Growth(base_length=len(tokenizer))
    if not settings.added_tokens:
        return growth
    vocab = tokenizer.get_vocab()
    growth.present = [t for t in settings.added_tokens if t in vocab]
    texts = {}
    for token, text in settings.new_token_init_text.items():
        texts[token] = tokenizer(text, add_special_tokens=False)["input_ids"]
    plain = [t for t in settings.add_tokens if t not in vocab]
    special = [t for t in settings.add_special_tokens if t not in vocab]
    if plain:
        tokenizer.add_tokens(plain)
    if special:
        tokenizer.add_tokens(special, special_tokens=True)
    ids = tokenizer.convert_tokens_to_ids(plain + special)
    growth.added = dict(zip(plain + special, ids))
    growth.init_ids = {growth.added[t]: texts[t] for t in texts if t in growth.added}
    return growth


def _row_means(weight: torch.Tensor, known: int, init_ids: dict[int, list[int]], new_ids: list[int]) -> torch.Tensor:
    """One fp32 row per new id: the mean of the given text's rows, else of rows [0, known)."""
    mean = weight[:known].float().mean(0)
    rows = []
    for i in new_ids:
        text = [j for j in init_ids.get(i, []) if j < known]
        rows.append(weight[text].float().mean(0) if text else mean)
    return torch.stack(rows)


@torch.no_grad()
def grow_embeddings(model: nn.Module, growth: Growth) -> int:
    """Give every added token a row (resizing where the tokenizer outgrew the embedding; a model whose embedding has
    spare rows past its tokenizer uses them) and set the new rows of the input embedding and of an untied head to
    their starting values. Returns the number of rows the embedding grew by."""
    if not growth.added:
        return 0
    embedding = model.get_input_embeddings()
    rows = embedding.weight.shape[0]
    needed = max(growth.added.values()) + 1
    if needed > rows:
        model.resize_token_embeddings(needed, mean_resizing=False)
        embedding = model.get_input_embeddings()
    known = min(growth.base_length, rows)
    new_ids = sorted(growth.added.values())
    index = torch.tensor(new_ids, device=embedding.weight.device)
    heads = [embedding.weight]
    head = model.get_output_embeddings()
    if head is not None and head.weight is not embedding.weight:
        heads.append(head.weight)
    for weight in heads:
        values = _row_means(weight, known, growth.init_ids, new_ids)
        weight.index_copy_(0, index.to(weight.device), values.to(weight.dtype))
    return max(0, needed - rows)


def token_ids(tokenizer, tokens: list[str | int], field_name: str = "model.trainable_tokens") -> list[int]:
    """The ids of `tokens` (strings, each one token of this tokenizer, or ids below its length)."""
    out = []
    for token in tokens:
        if isinstance(token, int):
            if not 0 <= token < len(tokenizer):
                raise ConfigError(f"{field_name}: id {token} is outside the vocabulary (0..{len(tokenizer) - 1})")
            out.append(token)
            continue
        i = tokenizer.convert_tokens_to_ids(token)
        if i is None or (i == tokenizer.unk_token_id and token != tokenizer.unk_token):
            pieces = tokenizer(token, add_special_tokens=False)["input_ids"]
            if len(pieces) != 1:
                raise ConfigError(f"{field_name}: {token!r} is not one token of this vocabulary (it splits into "
                                  f"{len(pieces)}: {tokenizer.convert_ids_to_tokens(pieces)}); add it with "
                                  "model.add_tokens, or name its pieces")
            i = pieces[0]
        out.append(i)
    return out


@torch.no_grad()
def fit_embeddings(model: nn.Module, tokenizer) -> None:
    """Resize a base whose embedding has fewer rows than `tokenizer` (an adapter's grown one) to it; the new rows
    start as the mean of the existing ones (an adapter with trained rows then puts its own in place)."""
    embedding = model.get_input_embeddings()
    rows = embedding.weight.shape[0]
    if len(tokenizer) > rows:
        grow_embeddings(model, Growth(added={f"<{i}>": i for i in range(rows, len(tokenizer))}, base_length=rows))
