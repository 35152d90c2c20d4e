"""Context distillation's data: each example twice, as the student sees it (the bare conversation) and as the teacher
sees it (a system prompt and N few-shot examples before the same conversation), with the same answer tokens scored.

The shots are chosen from the training data as `tunesmith icl` chooses them (infer/icl.py's ExampleSelector: the
first N, seeded random, or nearest by embedding), never the example itself, and put before the conversation as
alternating user/assistant turns. Only the conversation's own answers are labelled in the teacher's sequence: the
last n labelled tokens, n being the student's, aligned by position from the end of the prompt. An answer that
tokenizes differently after the context (a template that rewrites earlier turns) is refused, naming the record.

Batches carry both (`teacher_*` keys), and `label_order` for each: the permutation that puts the label rows of a
packed batch (gathered row by row, examples in packing order) in example order, so the two line up.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from tunesmith.data.chat import IGNORE, Chat, Tokenized
from tunesmith.data.packing import collate, pack_rows, shifted_targets
from tunesmith.data.templates import tokenize_chat
from tunesmith.errors import DataError
from tunesmith.infer.icl import ExampleSelector, examples_from_chats


@dataclass
class ContextExample(Tokenized):
    """The student's tokens and labels, and the teacher's (context + the same conversation)."""
    teacher_ids: list[int] = field(default_factory=list)
    teacher_labels: list[int] = field(default_factory=list)

    def teacher(self) -> Tokenized:
        return Tokenized(self.teacher_ids, self.teacher_labels, self.where)


def teacher_chat(item: Chat, shots: list, system: str | None) -> Chat:
    """`system` (joined before the record's own system prompt), the shots as turns, then the conversation."""
    messages = item.messages
    own = messages[0]["content"] if messages[0]["role"] == "system" else None
    joined = "\n\n".join(s for s in (system, own) if s)
    out = [{"role": "system", "content": joined}] if joined else []
    for shot in shots:
        out += [dict(m) for m in shot.messages] + [{"role": "assistant", "content": shot.answer}]
    return Chat(out + [dict(m) for m in messages if m["role"] != "system"], item.where)


def with_teacher(example: Tokenized, chat: Chat, tokenizer) -> ContextExample:
    """The example with the teacher's tokens: its labels only on the conversation's answers, which must be the
    student's label tokens."""
    teacher = tokenize_chat(tokenizer, chat)
    wanted = [t for t in example.labels if t != IGNORE]
    labelled = [j for j, t in enumerate(teacher.labels) if t != IGNORE]
    keep = set(labelled[len(labelled) - len(wanted):]) if wanted else set()
    labels = [t if j in keep else IGNORE for j, t in enumerate(teacher.labels)]
    if [t for t in labels if t != IGNORE] != wanted:
        raise DataError(f"{example.where}: the answer's tokens differ once the teacher's context is put before it "
                        "(the chat template renders the conversation differently after other turns), so the "
                        "teacher's and the student's answer positions cannot be matched")
    return ContextExample(example.input_ids, example.labels, example.where, teacher.input_ids, labels)


def add_context(examples: list[Tokenized], items: dict, selector: ExampleSelector | None, few_shot: int,
                system: str | None, tokenizer) -> list[ContextExample]:
    """Each example with its teacher's sequence; `items`: the normalised chat of each example by its `where`."""
    out = []
    for number, example in enumerate(examples):
        chat = items[example.where]
        shots = []
        if selector is not None and few_shot:
            query = examples_from_chats([chat])[0]
            found = selector.select(query, few_shot + 1, number)
            shots = [s for s in found if s.where != chat.where][:few_shot]
        out.append(with_teacher(example, teacher_chat(chat, shots, system), tokenizer))
    return out


def build_selector(train_items: list, settings, seed: int) -> ExampleSelector | None:
    if not settings.few_shot:
        return None
    pool = examples_from_chats(train_items)
    if len(pool) <= settings.few_shot:
        raise DataError(f"distill.teacher_context.few_shot: {settings.few_shot} shots need more than "
                        f"{settings.few_shot} training examples to choose from (an example is never its own shot); "
                        f"the training data has {len(pool)}")
    return ExampleSelector(pool, settings.select, seed)


def label_order(examples: list[Tokenized], packing: bool, capacity: int) -> torch.Tensor:
    """Indices that put a batch's gathered label rows (`hidden[targets != IGNORE]`) in example order."""
    counts = [sum(1 for t in shifted_targets(e) if t != IGNORE) for e in examples]
    reading = [i for row in pack_rows(examples, capacity) for i in row] if packing else range(len(examples))
    start, at = {}, 0
    for i in reading:
        start[i] = at
        at += counts[i]
    if not counts:
        return torch.zeros(0, dtype=torch.long)
    return torch.cat([torch.arange(start[i], start[i] + counts[i]) for i in range(len(examples))])


def collate_with_teacher(examples: list[Tokenized], cfg, pad_id: int) -> dict[str, torch.Tensor]:
    """The student's batch, its `label_order`, and where the examples carry a context the teacher's batch
    (`teacher_<key>`) with its own."""
    packing, capacity = cfg.data.packing, cfg.data.max_length
    batch = collate(examples, packing, capacity, pad_id, cfg.data.share_prefixes)
    batch["label_order"] = label_order(examples, packing, capacity)
    if examples and isinstance(examples[0], ContextExample):
        teachers = [e.teacher() for e in examples]
        capacity = max(capacity, max(len(t) for t in teachers))
        for key, value in collate(teachers, packing, capacity, pad_id, cfg.data.share_prefixes).items():
            batch[f"teacher_{key}"] = value
        batch["teacher_label_order"] = label_order(teachers, packing, capacity)
    return batch


def teacher_batch(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The teacher's part of a batch under the student's key names (the student's own batch without a context)."""
    if "teacher_input_ids" not in batch:
        return batch
    return {key[len("teacher_"):]: value for key, value in batch.items() if key.startswith("teacher_")}
