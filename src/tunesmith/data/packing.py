"""Batches: padding-free packing with per-example positions and a block-diagonal causal mask, or plain padding.

A packed batch also carries each token's example index in its row (`segments`, −1 on padding) and the plan of the
one padding-free row that kernels/segment_attention.py runs it as, with shared leading tokens once (data/shared_prefixes.py).

Targets are shifted inside each example before packing, so no example ever predicts its neighbour's tokens.
"""

from __future__ import annotations

import torch

from tunesmith.data.chat import IGNORE, Tokenized
from tunesmith.data.shared_prefixes import MIN_SHARED, decoder_plan


def shifted_targets(ex: Tokenized) -> list[int]:
    return ex.labels[1:] + [IGNORE]


def pack_rows(examples: list[Tokenized], capacity: int) -> list[list[int]]:
    """First-fit decreasing: indices of the examples in each row, no row over `capacity` tokens."""
    order = sorted(range(len(examples)), key=lambda i: -len(examples[i]))
    rows: list[list[int]] = []
    room: list[int] = []
    for i in order:
        n = len(examples[i])
        for r, free in enumerate(room):
            if n <= free:
                rows[r].append(i)
                room[r] -= n
                break
        else:
            rows.append([i])
            room.append(capacity - n)
    return rows


def block_causal_mask(segments: torch.Tensor) -> torch.Tensor:
    """(B, L) segment ids → (B, 1, L, L) bool mask: attend to earlier tokens of the same segment only."""
    same = segments[:, :, None] == segments[:, None, :]
    causal = torch.ones(segments.shape[1], segments.shape[1], dtype=torch.bool).tril()
    return (same & causal)[:, None]


def row_plan(examples: list[Tokenized], rows: list[list[int]], share_prefixes: bool) -> dict[str, torch.Tensor]:
    """The padding-free row plan of packed `rows`, its sequences in the rows' reading order."""
    in_order = [examples[i].input_ids for row in rows for i in row]
    return decoder_plan(in_order, MIN_SHARED if share_prefixes else 0)


def collate_packed(examples: list[Tokenized], capacity: int, pad_id: int,
                   share_prefixes: bool = True) -> dict[str, torch.Tensor]:
    rows = pack_rows(examples, capacity)
    width = max(sum(len(examples[i]) for i in row) for row in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    targets = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    positions = torch.zeros((len(rows), width), dtype=torch.long)
    segments = torch.full((len(rows), width), -1, dtype=torch.long)
    for r, row in enumerate(rows):
        at = 0
        for seg, i in enumerate(row):
            ex = examples[i]
            n = len(ex)
            ids[r, at : at + n] = torch.tensor(ex.input_ids)
            targets[r, at : at + n] = torch.tensor(shifted_targets(ex))
            positions[r, at : at + n] = torch.arange(n)
            segments[r, at : at + n] = seg
            at += n
        positions[r, at:] = torch.arange(width - at)
    return {"input_ids": ids, "targets": targets, "position_ids": positions,
            "attention_mask": block_causal_mask(segments), "segments": segments,
            **row_plan(examples, rows, share_prefixes)}


def collate_padded(examples: list[Tokenized], pad_id: int) -> dict[str, torch.Tensor]:
    width = max(len(ex) for ex in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    targets = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for r, ex in enumerate(examples):
        n = len(ex)
        ids[r, :n] = torch.tensor(ex.input_ids)
        targets[r, :n] = torch.tensor(shifted_targets(ex))
        mask[r, :n] = 1
    positions = torch.arange(width).expand(len(examples), width).clone()
    return {"input_ids": ids, "targets": targets, "position_ids": positions, "attention_mask": mask}


def collate(examples: list[Tokenized], packing: bool, capacity: int, pad_id: int,
            share_prefixes: bool = True) -> dict[str, torch.Tensor]:
    if packing:
        return collate_packed(examples, capacity, pad_id, share_prefixes)
    return collate_padded(examples, pad_id)
