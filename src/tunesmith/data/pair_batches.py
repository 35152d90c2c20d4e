"""Preference pairs as tensors: each pair's two answers tokenized after their shared prompt (labels on the answer
only), their length policy, and batches of sequences whose last tokens and sequence ids come from the lengths."""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import ClassVar

import torch

from tunesmith.data.chat import IGNORE, Chat, Tokenized, assistant_spans, ensure_chat_template
from tunesmith.data.packing import block_causal_mask, pack_rows, row_plan, shifted_targets
from tunesmith.data.pipeline import Datasets, split_items
from tunesmith.data.preference import DataWarning, PreferenceItem, require_answers
from tunesmith.data.templates import LengthReport
from tunesmith.errors import DataError


@dataclass
class TokenizedPair:
    chosen: Tokenized
    rejected: Tokenized
    where: str
    margin: float | None = None
    reference_logps: tuple[float, float] | None = None  # cached (chosen, rejected) log-probs of the reference

    def __len__(self) -> int:
        return len(self.chosen) + len(self.rejected)

    @property
    def n_labels(self) -> int:
        return self.chosen.n_labels + self.rejected.n_labels


@dataclass
class PairReport(LengthReport):
    identical: int = 0
    identical_where: list[str] = field(default_factory=list)
    unit: ClassVar[str] = "pairs"

    def notes(self) -> list[str]:
        if not self.identical:
            return []
        return [f"{self.identical} dropped as chosen == rejected (first: {self.identical_where[0]})"]


def drop_identical(items: list[PreferenceItem], report: PairReport) -> list[PreferenceItem]:
    """A pair whose answers are the same teaches nothing (and gives DPO a zero gradient): count, warn, drop."""
    kept = []
    for item in items:
        if item.chosen.strip() == item.rejected.strip():
            report.identical += 1
            report.identical_where.append(item.where)
        else:
            kept.append(item)
    if report.identical:
        warnings.warn(f"{report.identical} preference pair(s) have identical chosen and rejected answers and were "
                      f"dropped (first at {report.identical_where[0]})", DataWarning, stacklevel=2)
    return kept


def tokenize_answer(tokenizer, prompt: list[dict], answer: str, where: str = "") -> Tokenized:
    """prompt + answer rendered by the chat template, cut after the answer's end-of-turn token; labels on the
    answer's tokens only."""
    ensure_chat_template(tokenizer)
    text, spans = assistant_spans(tokenizer, Chat([*prompt, {"role": "assistant", "content": answer}], where))
    start, end = spans[-1]
    enc = tokenizer(text[:end], add_special_tokens=False, return_offsets_mapping=True)
    ids = list(enc["input_ids"])
    labels = [t if s >= start else IGNORE for t, (s, _e) in zip(ids, enc["offset_mapping"])]
    return Tokenized(ids, labels, where)


def tokenize_pairs(tokenizer, items: list[PreferenceItem], max_length: int, policy: str
                   ) -> tuple[list[TokenizedPair], PairReport]:
    report = PairReport(policy, max_length)
    pairs = []
    for item in drop_identical(items, report):
        fitted = fit_length((tokenize_answer(tokenizer, item.prompt, item.chosen, item.where),
                             tokenize_answer(tokenizer, item.prompt, item.rejected, item.where)),
                            max_length, policy, report)
        if fitted is not None:
            pairs.append(TokenizedPair(*fitted, item.where, item.margin))
    require_kept(items, pairs, report, "preference pairs")
    return pairs, report


def fit_length(seqs: tuple[Tokenized, ...], max_length: int, policy: str, report, min_labels: int = 1
               ) -> tuple[Tokenized, ...] | None:
    """The length policy on sequences kept or dropped together (a pair's two answers): kept as they are when the
    longest fits; else dropped (policy "drop") or each cut to max_length, dropped still when a cut one keeps fewer
    than `min_labels` predicted tokens. Counts into `report`; None when dropped."""
    longest = max(len(s) for s in seqs)
    report.longest = max(report.longest, longest)
    if longest <= max_length:
        return seqs
    cut = tuple(Tokenized(s.input_ids[:max_length], s.labels[:max_length], s.where) for s in seqs)
    if policy == "drop" or min(s.n_labels for s in cut) < min_labels:
        report.dropped += 1
        report.dropped_where.append(seqs[0].where)
        return None
    report.truncated += 1
    return cut


def require_kept(items: list, kept: list, report, what: str) -> None:
    """Record how many were kept; none kept out of some is an error naming the length settings."""
    report.kept = len(kept)
    if items and not kept:
        raise DataError(f"none of the {len(items)} {what} is left: {report.summary()}; raise "
                        "data.max_length or set data.overlong: truncate")


def tokenize_splits(tokenize, tokenizer, cfg, train_items: list, eval_items: list) -> tuple:
    """`tokenize(tokenizer, items, max_length, policy)` over the train and the eval items:
    (train, eval, train report, eval report); no eval items: ([], None) for the eval side."""
    train, train_report = tokenize(tokenizer, train_items, cfg.data.max_length, cfg.overlong)
    evals, eval_report = tokenize(tokenizer, eval_items, cfg.data.max_length, cfg.overlong) if eval_items \
        else ([], None)
    return train, evals, train_report, eval_report


def build_pair_datasets(cfg, tokenizer, with_items: bool = True):
    """The `Datasets` of a pair objective; `with_items` keeps the items for sample generations (prompt → chosen)."""
    fmt, train_items, eval_items = split_items(cfg)
    require_answers(train_items + eval_items, cfg.objective)
    train, evals, train_report, eval_report = tokenize_splits(tokenize_pairs, tokenizer, cfg, train_items, eval_items)
    if not with_items:
        train_items, eval_items = [], []
    return Datasets(train, evals, train_items, eval_items, fmt, train_report, eval_report)


def collate_sequences(seqs: list[Tokenized], packing: bool, capacity: int, pad_id: int,
                      share_prefixes: bool = True) -> dict[str, torch.Tensor]:
    """Sequences → one batch, packed (block-diagonal mask, per-sequence positions) or padded on the right.

    Besides the model inputs and shifted `targets`, it records for every position the index of the sequence it
    belongs to (`sequence`, -1 on padding) and for every sequence the flat index of its last token (`last`), from
    the lengths, never by looking for a pad token (pad == eos in many chat models).
    """
    rows = pack_rows(seqs, capacity) if packing else [[i] for i in range(len(seqs))]
    width = max(sum(len(seqs[i]) for i in row) for row in rows)
    shape = (len(rows), width)
    ids = torch.full(shape, pad_id, dtype=torch.long)
    targets = torch.full(shape, IGNORE, dtype=torch.long)
    positions = torch.zeros(shape, dtype=torch.long)
    segments = torch.full(shape, -1, dtype=torch.long)
    sequence = torch.full(shape, -1, dtype=torch.long)
    last = torch.zeros(len(seqs), dtype=torch.long)
    for r, row in enumerate(rows):
        at = 0
        for seg, i in enumerate(row):
            ex, n = seqs[i], len(seqs[i])
            ids[r, at : at + n] = torch.tensor(ex.input_ids)
            targets[r, at : at + n] = torch.tensor(shifted_targets(ex))
            positions[r, at : at + n] = torch.arange(n)
            segments[r, at : at + n] = seg
            sequence[r, at : at + n] = i
            last[i] = r * width + at + n - 1
            at += n
        positions[r, at:] = torch.arange(width - at)
    batch = {"input_ids": ids, "targets": targets, "position_ids": positions, "sequence": sequence, "last": last}
    if not packing:
        return {**batch, "attention_mask": (segments >= 0).long()}
    return {**batch, "attention_mask": block_causal_mask(segments), "segments": segments,
            **row_plan(seqs, rows, share_prefixes)}


def collate_pairs(pairs: list[TokenizedPair], packing: bool, capacity: int, pad_id: int,
                  default_margin: float = 0.0, share_prefixes: bool = True) -> dict[str, torch.Tensor]:
    """Sequences 0..n-1 are the chosen answers, n..2n-1 the rejected ones, pair by pair."""
    batch = collate_sequences([p.chosen for p in pairs] + [p.rejected for p in pairs], packing, capacity, pad_id,
                              share_prefixes)
    batch["margin"] = torch.tensor([default_margin if p.margin is None else p.margin for p in pairs])
    if all(p.reference_logps is not None for p in pairs):
        batch["reference_logps"] = torch.tensor([p.reference_logps for p in pairs])
    return batch
