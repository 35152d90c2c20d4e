"""The one padding-free row a packed batch runs as, with the leading tokens that examples share computed once.

Examples of one batch often begin alike: every SFT example repeats the chat template's system prompt, and a DPO
pair's chosen and rejected sequences repeat their prompt. Under causal attention a token's hidden states depend only
on the tokens before it, so identical leading tokens at identical positions have identical hidden states in every
layer. The plan lays such a shared run out once, as a segment of its own, and each example that continues it becomes
a child segment that attends to its ancestors' keys and values and then causally to itself
(kernels/segment_attention.py). `gather` maps every example token back to the row position that computed it, so the loss
sees each example whole, and the gradients of a shared run sum over the examples that share it: the same values as
computing every example separately, up to the order of floating-point sums.

Only runs of at least `min_shared` tokens are shared; shorter common runs are repeated in each child.

Under dropout a shared run is dropped out once, so the examples that share it would share one dropout mask instead
of drawing one each: a run turns sharing off while any dropout of the model is on (`dropout_in`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

MIN_SHARED = 8


def dropout_in(model: torch.nn.Module) -> str | None:
    """The first dropout with p > 0 that training would apply in `model` (a module's name, or the config's
    attention dropout), or None."""
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.modules.dropout._DropoutNd) and module.p > 0:
            return f"{name} (p={module.p:g})"
    attention = getattr(getattr(model, "config", None), "attention_dropout", 0.0) or 0.0
    return f"the model's attention_dropout (p={attention:g})" if attention > 0 else None


@dataclass
class _Layout:
    ids: list[int] = field(default_factory=list)
    positions: list[int] = field(default_factory=list)
    segments: list[tuple[int, int, int]] = field(default_factory=list)  # (start, length, parent segment or -1)

    def add(self, tokens: list[int], first_position: int, parent: int) -> tuple[int, int]:
        """Append one segment; returns (its index, its start in the row)."""
        start = len(self.ids)
        self.ids += tokens
        self.positions += range(first_position, first_position + len(tokens))
        self.segments.append((start, len(tokens), parent))
        return len(self.segments) - 1, start


def _common_length(sequences: list[list[int]], start: int) -> int:
    """How many tokens from `start` on all sequences share."""
    first, n = sequences[0], 0
    limit = min(len(s) for s in sequences) - start
    while n < limit and all(s[start + n] == first[start + n] for s in sequences[1:]):
        n += 1
    return n


def _lay_out(seqs: list[list[int]], members: list[int], start: int, parent: int, rows: list[list[int]],
             layout: _Layout, min_shared: int) -> None:
    """Lay out `members`, which share tokens [0, start) computed by the chain ending at segment `parent`;
    rows[i] collects where example i's tokens sit in the row."""
    group = [seqs[i] for i in members]
    shared = _common_length(group, start) if len(members) > 1 else 0
    if shared >= min_shared:
        segment, at = layout.add(group[0][start : start + shared], start, parent)
        for i in members:
            rows[i] += range(at, at + shared)
        end = start + shared
        by_next: dict[int, list[int]] = {}
        for i in members:
            if len(seqs[i]) > end:
                by_next.setdefault(seqs[i][end], []).append(i)
        for children in by_next.values():
            _lay_out(seqs, children, end, segment, rows, layout, min_shared)
        return
    if len(members) > 1:  # no long run shared by all: look for subgroups that share one among themselves
        by_run: dict[tuple, list[int]] = {}
        for i in members:
            key = tuple(seqs[i][start : start + min_shared]) if len(seqs[i]) >= start + min_shared else (i, -1)
            by_run.setdefault(key, []).append(i)
        if len(by_run) < len(members):
            for subgroup in by_run.values():
                _lay_out(seqs, subgroup, start, parent, rows, layout, min_shared)
            return
    for i in members:
        if len(seqs[i]) > start:
            _, at = layout.add(seqs[i][start:], start, parent)
            rows[i] += range(at, at + len(seqs[i]) - start)


def decoder_plan(sequences: list[list[int]], min_shared: int = MIN_SHARED) -> dict[str, torch.Tensor]:
    """The row for `sequences` (token ids, each at positions 0..n-1) and how to read each sequence back from it.

    decoder_ids, decoder_positions (T,): the row; segment_plan (S, 3): start, length, parent segment (−1 for none);
    decoder_gather (Σ n,): for each token of sequence 0, then 1, …, its position in the row.
    min_shared = 0 turns sharing off: one segment per sequence, in order."""
    layout = _Layout()
    rows: list[list[int]] = [[] for _ in sequences]
    if min_shared > 0:
        _lay_out(sequences, list(range(len(sequences))), 0, -1, rows, layout, min_shared)
    else:
        for i, seq in enumerate(sequences):
            _, at = layout.add(seq, 0, -1)
            rows[i] += range(at, at + len(seq))
    return {"decoder_ids": torch.tensor(layout.ids, dtype=torch.long),
            "decoder_positions": torch.tensor(layout.positions, dtype=torch.long),
            "segment_plan": torch.tensor(layout.segments, dtype=torch.long).reshape(-1, 3),
            "decoder_gather": torch.tensor([p for row in rows for p in row], dtype=torch.long)}
