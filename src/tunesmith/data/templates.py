"""Chats and documents → token ids and labels. Loss goes on assistant turns and their end-of-turn token only."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from tunesmith.data.chat import IGNORE, Chat, Document, Tokenized, assistant_spans, ensure_chat_template
from tunesmith.errors import DataError


@dataclass
class LengthReport:
    policy: str
    max_length: int
    kept: int = 0
    dropped: int = 0
    truncated: int = 0
    split_extra: int = 0
    longest: int = 0
    dropped_where: list[str] = field(default_factory=list)
    unit: ClassVar[str] = "examples"

    def notes(self) -> list[str]:
        """What a kind of report counts besides, said right after the kept count."""
        return []

    def summary(self) -> str:
        parts = [f"{self.kept} {self.unit} kept", *self.notes()]
        if self.dropped:
            parts.append(f"{self.dropped} dropped as longer than max_length={self.max_length}")
        if self.truncated:
            parts.append(f"{self.truncated} truncated to max_length={self.max_length}")
        if self.split_extra:
            parts.append(f"{self.split_extra} extra pieces from splitting long documents")
        return ", ".join(parts) + f" (policy: {self.policy}; longest {self.longest} tokens)"

    def merged(self, other: "LengthReport") -> "LengthReport":
        """Both reports' counts together (the tasks of a multi-task run)."""
        return LengthReport(self.policy, self.max_length, self.kept + other.kept, self.dropped + other.dropped,
                            self.truncated + other.truncated, self.split_extra + other.split_extra,
                            max(self.longest, other.longest), self.dropped_where + other.dropped_where)


def tokenize_chat(tokenizer, chat: Chat, train_on_prompt: bool = False) -> Tokenized:
    text, spans = assistant_spans(tokenizer, chat)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = enc["input_ids"]
    if train_on_prompt:
        return Tokenized(list(ids), list(ids), chat.where)
    labels = [IGNORE] * len(ids)
    for j, (s, _e) in enumerate(enc["offset_mapping"]):
        if any(a <= s < b for a, b in spans):
            labels[j] = ids[j]
    return Tokenized(list(ids), labels, chat.where)


def tokenize_document(tokenizer, doc: Document) -> Tokenized:
    ids = list(tokenizer(doc.text)["input_ids"])
    if tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    return Tokenized(ids, list(ids), doc.where)


def apply_length_policy(examples: list[Tokenized], max_length: int, policy: str) -> tuple[list[Tokenized], LengthReport]:
    report = LengthReport(policy, max_length)
    out: list[Tokenized] = []
    for ex in examples:
        report.longest = max(report.longest, len(ex))
        if len(ex) <= max_length:
            out.append(ex)
        elif policy == "drop":
            report.dropped += 1
            report.dropped_where.append(ex.where)
        elif policy == "truncate":
            report.truncated += 1
            out.append(Tokenized(ex.input_ids[:max_length], ex.labels[:max_length], ex.where))
        else:  # split
            pieces = [Tokenized(ex.input_ids[i : i + max_length], ex.labels[i : i + max_length], ex.where)
                      for i in range(0, len(ex), max_length)]
            report.split_extra += len(pieces) - 1
            out.extend(pieces)
    out = [ex for ex in out if ex.n_labels > 0]
    report.kept = len(out)
    if examples and not out:
        raise DataError(
            f"every one of the {len(examples)} examples is longer than data.max_length={max_length} tokens "
            f"(longest {report.longest}) or has no trainable tokens left; raise data.max_length or set "
            "data.overlong: truncate"
        )
    return out, report


def tokenize_all(tokenizer, items: list, train_on_prompt: bool = False) -> list[Tokenized]:
    ensure_chat_template(tokenizer)
    out = []
    for item in items:
        if isinstance(item, Document):
            out.append(tokenize_document(tokenizer, item))
        else:
            out.append(tokenize_chat(tokenizer, item, train_on_prompt))
    return out
