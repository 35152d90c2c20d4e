"""Calibration data for GPTQ: a data file (any format tunesmith reads) → fixed-length windows of token ids."""

from __future__ import annotations

import torch

from tunesmith.errors import DataError


def _names(paths) -> str:
    return paths if isinstance(paths, str) else ", ".join(map(str, paths))


def texts_of(paths) -> list[str]:
    from tunesmith.data.chat import Chat, Document
    from tunesmith.data.formats import normalize_all
    from tunesmith.data.sources import read_many

    fmt, items = normalize_all(read_many(paths))
    if fmt == "preference":
        raise DataError(f"--calib {_names(paths)}: preference pairs are not calibration text; give text or chat data")
    return [item.text if isinstance(item, Document) else item for item in items if isinstance(item, Document | Chat)]


def calibration_windows(paths, tokenizer, samples: int, seq_len: int, minimum_tokens: int,
                        why_minimum: str = "") -> torch.Tensor:
    """`samples` windows of `seq_len` tokens, spread evenly over the concatenated, tokenised data (chats rendered
    with the chat template). Fewer than `minimum_tokens` in all is refused: the layer Hessians XᵀX would be
    rank-deficient and GPTQ's error feedback would be fitted to noise."""
    from tunesmith.data.chat import Chat, render

    stream: list[int] = []
    for item in texts_of(paths):
        text = render(tokenizer, item.messages) if isinstance(item, Chat) else item
        stream += tokenizer(text)["input_ids"] + ([tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else [])
    available = len(stream) // seq_len
    n = min(samples, available)
    if n * seq_len < minimum_tokens:
        have = f"{len(stream):,} tokens" + (f" ({available} windows of {seq_len})" if available < samples else
                                             f"; --samples {samples} × --seq-len {seq_len} = {samples * seq_len:,}")
        raise DataError(f"--calib {_names(paths)}: calibration set too small: {have}, and GPTQ needs at least "
                        f"{minimum_tokens:,} tokens{why_minimum}. Add data or raise --samples/--seq-len.")
    stride = (len(stream) - seq_len) // max(1, n - 1) if n > 1 else 0
    starts = [i * stride for i in range(n)]
    return torch.tensor([stream[s:s + seq_len] for s in starts], dtype=torch.long)
