"""Preference pairs: a prompt with a chosen and a rejected answer → two token sequences that share the prompt.

Accepted records (any file type `data/sources.py` reads):
  {"prompt": "text" | [messages], "chosen": "text" | [assistant turn], "rejected": ..., "margin"?: float}
  {"chosen": [conversation], "rejected": [conversation]}   (the prompt is what the two have in common)
Rendered with the tokenizer's chat template; the answer's tokens, through its end-of-turn token, are the
completion (the only tokens scored); nothing after the end-of-turn token is kept.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import torch

from tunesmith.data.formats import Chat, _check_chat, _turns
from tunesmith.data.packing import block_causal_mask, pack_rows, row_plan, shifted_targets
from tunesmith.data.sources import Record
from tunesmith.data.templates import IGNORE, Tokenized, _assistant_spans, ensure_chat_template
from tunesmith.errors import DataError

FORMAT_HELP = ("preference format expects 'prompt' (text or messages) with 'chosen' and 'rejected' (text or a "
               "list holding one assistant turn), or 'chosen' and 'rejected' as whole conversations")


class DataWarning(UserWarning):
    """Something in the data was dropped; the run goes on without it."""


@dataclass
class PreferenceItem:
    prompt: list[dict[str, str]]
    chosen: str | None
    rejected: str | None
    where: str
    margin: float | None = None


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
class PairReport:
    policy: str
    max_length: int
    kept: int = 0
    identical: int = 0
    dropped: int = 0
    truncated: int = 0
    longest: int = 0
    identical_where: list[str] = field(default_factory=list)

    def summary(self) -> str:
        parts = [f"{self.kept} pairs kept"]
        if self.identical:
            parts.append(f"{self.identical} dropped as chosen == rejected (first: {self.identical_where[0]})")
        if self.dropped:
            parts.append(f"{self.dropped} dropped as longer than max_length={self.max_length}")
        if self.truncated:
            parts.append(f"{self.truncated} truncated to max_length={self.max_length}")
        return ", ".join(parts) + f" (policy: {self.policy}; longest {self.longest} tokens)"


def _answer(record: Record, key: str) -> str:
    value = record.fields[key]
    if isinstance(value, dict):
        value = [value]
    if isinstance(value, list):
        turns = _turns(Record({key: value}, record.where), "messages", key, "role", "content")
        if len(turns) != 1 or turns[0]["role"] != "assistant":
            raise DataError(f"{record.where}: '{key}' must be text or a list holding one assistant turn (got "
                            f"{len(turns)} turns: {', '.join(t['role'] for t in turns)}); put earlier turns in "
                            "'prompt'")
        value = turns[0]["content"]
    if not isinstance(value, str):
        raise DataError(f"{record.where}: '{key}' must be text or a list of messages, got {type(value).__name__}")
    if not value.strip():
        raise DataError(f"{record.where}: '{key}' is empty")
    return value


def _prompt(record: Record) -> list[dict[str, str]]:
    value = record.fields["prompt"]
    if isinstance(value, str):
        if not value.strip():
            raise DataError(f"{record.where}: 'prompt' is empty")
        return [{"role": "user", "content": value}]
    if isinstance(value, list):
        turns = _turns(record, "messages", "prompt", "role", "content")
        if turns[-1]["role"] == "assistant":
            raise DataError(f"{record.where}: 'prompt' ends with an assistant turn; the answers go in 'chosen' and "
                            "'rejected'")
        return turns
    raise DataError(f"{record.where}: 'prompt' must be text or a list of messages, got {type(value).__name__}")


def _implicit_prompt(record: Record) -> tuple[list[dict], str, str]:
    """Whole conversations in 'chosen' and 'rejected': the prompt is everything but their last assistant turns."""
    chosen = _turns(record, "messages", "chosen", "role", "content")
    rejected = _turns(record, "messages", "rejected", "role", "content")
    for key, turns in (("chosen", chosen), ("rejected", rejected)):
        if turns[-1]["role"] != "assistant":
            raise DataError(f"{record.where}: '{key}' must end with an assistant turn")
    if chosen[:-1] != rejected[:-1] or len(chosen) < 2:
        raise DataError(f"{record.where}: without a 'prompt', 'chosen' and 'rejected' must be conversations that "
                        "share every turn but the last assistant one")
    return chosen[:-1], chosen[-1]["content"], rejected[-1]["content"]


def normalize_pair(record: Record, system_prompt: str | None = None) -> PreferenceItem:
    """One record → a PreferenceItem. Without both answers (a prompt-only record) chosen/rejected are None."""
    keys = record.fields
    has = {k: keys.get(k) is not None for k in ("prompt", "chosen", "rejected")}
    if has["chosen"] != has["rejected"]:
        missing = "rejected" if has["chosen"] else "chosen"
        raise DataError(f"{record.where}: record is missing '{missing}' ({FORMAT_HELP})")
    if has["prompt"]:
        prompt = _prompt(record)
        chosen = _answer(record, "chosen") if has["chosen"] else None
        rejected = _answer(record, "rejected") if has["rejected"] else None
    elif has["chosen"] and isinstance(keys["chosen"], list) and len(keys["chosen"]) > 1:
        prompt, chosen, rejected = _implicit_prompt(record)
    else:
        raise DataError(f"{record.where}: record is missing 'prompt' ({FORMAT_HELP})")
    for key, answer in (("chosen", chosen), ("rejected", rejected)):
        if answer is not None and not answer.strip():
            raise DataError(f"{record.where}: '{key}' is an empty answer")
    if system_prompt and prompt[0]["role"] != "system":
        prompt = [{"role": "system", "content": system_prompt}, *prompt]
    if chosen is not None:
        _check_chat([*prompt, {"role": "assistant", "content": chosen}], record.where)
    margin = keys.get("margin")
    if margin is not None and not isinstance(margin, (int, float)):
        raise DataError(f"{record.where}: 'margin' must be a number, got {type(margin).__name__}")
    return PreferenceItem(prompt, chosen, rejected, record.where, None if margin is None else float(margin))


def require_answers(items: list[PreferenceItem], objective: str) -> None:
    for item in items:
        if item.chosen is None:
            raise DataError(f"{item.where}: record has a 'prompt' but no 'chosen'/'rejected'; objective "
                            f"'{objective}' learns from pairs of answers")


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
    text, spans = _assistant_spans(tokenizer, Chat([*prompt, {"role": "assistant", "content": answer}], where))
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
        chosen = tokenize_answer(tokenizer, item.prompt, item.chosen, item.where)
        rejected = tokenize_answer(tokenizer, item.prompt, item.rejected, item.where)
        longest = max(len(chosen), len(rejected))
        report.longest = max(report.longest, longest)
        if longest > max_length:
            if policy == "drop":
                report.dropped += 1
                continue
            chosen, rejected = (Tokenized(s.input_ids[:max_length], s.labels[:max_length], s.where)
                                for s in (chosen, rejected))
            if not (chosen.n_labels and rejected.n_labels):
                report.dropped += 1
                continue
            report.truncated += 1
        pairs.append(TokenizedPair(chosen, rejected, item.where, item.margin))
    report.kept = len(pairs)
    if items and not pairs:
        raise DataError(f"none of the {len(items)} preference pairs is left: {report.summary()}; raise "
                        "data.max_length or set data.overlong: truncate")
    return pairs, report


def build_pair_datasets(cfg, tokenizer, with_items: bool = True):
    """The `Datasets` of a pair objective; `with_items` keeps the items for sample generations (prompt → chosen)."""
    from tunesmith.data.pipeline import Datasets, split_items

    fmt, train_items, eval_items = split_items(cfg)
    require_answers(train_items + eval_items, cfg.objective)
    train, train_report = tokenize_pairs(tokenizer, train_items, cfg.data.max_length, cfg.overlong)
    evals, eval_report = tokenize_pairs(tokenizer, eval_items, cfg.data.max_length, cfg.overlong) if eval_items \
        else ([], None)
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
