"""Labelled texts for classification: `{"text", "label"}` records, the label set (named in the config or collected
from the training data), and token ids whose last token is the one a classifier reads.

transformers' sequence classifiers read the rightmost token that is not the pad token, and a chat model's pad token
is often its end-of-sequence token (SmolLM2: both `<|im_end|>`). So a text is tokenized as transformers' pipeline
tokenizes it (the tokenizer's own special tokens), cut to data.max_length, and then loses any trailing pad tokens:
its last token is then the last non-pad one, the token the saved classifier reads too.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from tunesmith.data.chat import IGNORE, Tokenized
from tunesmith.data.pair_batches import fit_length, require_kept, tokenize_splits
from tunesmith.data.pipeline import Datasets, split_items
from tunesmith.data.sources import read_many
from tunesmith.data.templates import LengthReport
from tunesmith.errors import DataError

EXPECTED = "classification records are {\"text\": a non-empty string, \"label\": a string (or an integer)}"


@dataclass
class LabelledRecord:
    text: str
    label: str
    where: str


@dataclass
class LabelledText(Tokenized):
    label: int = 0  # index into the run's labels

    @property
    def n_labels(self) -> int:
        return 1  # one prediction per text


@dataclass
class LabelReport(LengthReport):
    unit: ClassVar[str] = "texts"
    labels: list[str] = field(default_factory=list)
    labels_from: str = ""
    counts: dict[str, int] = field(default_factory=dict)

    def summary(self) -> str:
        counts = ", ".join(f"{name} {self.counts.get(name, 0)}" for name in self.labels)
        return f"{super().summary()}; {len(self.labels)} labels ({self.labels_from}): {counts}"


def _label_of(value, where: str) -> str:
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise DataError(f"{where}: 'label' is {type(value).__name__} {value!r}; {EXPECTED}")
    label = str(value).strip()
    if not label:
        raise DataError(f"{where}: 'label' is empty; {EXPECTED}")
    return label


def read_labelled(paths, cfg=None, where: str = "data.train", fmt: str | None = None,
                  system_prompt: str | None = None) -> tuple[str, list[LabelledRecord]]:
    """Every record checked: a non-empty 'text' and a 'label' (pipeline.split_items' loader signature)."""
    out = []
    for record in read_many(paths):
        text, label = record.fields.get("text"), record.fields.get("label")
        if not isinstance(text, str) or not text.strip():
            got = "missing" if text is None else f"{type(text).__name__} {text!r}"
            raise DataError(f"{record.where}: 'text' is {got}; {EXPECTED}")
        if label is None:
            raise DataError(f"{record.where}: 'label' is missing; {EXPECTED}")
        out.append(LabelledRecord(text, _label_of(label, record.where), record.where))
    return "labelled", out


def label_set(configured: list[str] | None, train: list[LabelledRecord], held_out: list[LabelledRecord]
              ) -> tuple[list[str], str]:
    """(labels, where they came from): classify.labels in its order, else the training data's labels sorted. Every
    record's label must be among them."""
    if configured:
        labels, source, fix = list(configured), "classify.labels", "add it to classify.labels or fix the record"
    else:
        labels = sorted({r.label for r in train})
        source, fix = "collected from data.train, sorted", "name every label in classify.labels or fix the record"
        if len(labels) < 2:
            raise DataError(f"data.train: every record has the label {labels[0]!r}; a classifier needs at least two "
                            "labels")
    known = set(labels)
    for record in [*train, *held_out]:
        if record.label not in known:
            raise DataError(f"{record.where}: label {record.label!r} is not one of the labels ({source}: "
                            f"{', '.join(labels)}); {fix}")
    return labels, source


def without_trailing_pad(ids: list[int], pad_id: int | None) -> list[int]:
    end = len(ids)
    while end and ids[end - 1] == pad_id:
        end -= 1
    return ids[:end]


def text_ids(tokenizer, text: str, max_length: int, pad_id: int | None) -> list[int]:
    """The text's ids as the tokenizer gives them, at most max_length, without trailing pad tokens."""
    return without_trailing_pad(list(tokenizer(text)["input_ids"])[:max_length], pad_id)


def tokenize_labelled(tokenizer, records: list[LabelledRecord], labels: list[str], max_length: int, policy: str,
                      labels_from: str) -> tuple[list[LabelledText], LabelReport]:
    """The texts under the length policy (cut first, then their trailing pad tokens dropped), counted per label."""
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id  # the run's
    index = {name: i for i, name in enumerate(labels)}
    report = LabelReport(policy, max_length, labels=labels, labels_from=labels_from)
    out = []
    for record in records:
        whole = list(tokenizer(record.text)["input_ids"])
        fitted = fit_length((Tokenized(whole, [IGNORE] * len(whole), record.where),), max_length, policy, report,
                            min_labels=0)
        if fitted is None:
            continue
        ids = without_trailing_pad(fitted[0].input_ids, pad_id)
        if not ids:
            raise DataError(f"{record.where}: the text is nothing but the pad token ({pad_id}) once tokenized; "
                            f"{EXPECTED}")
        out.append(LabelledText(ids, [IGNORE] * len(ids), record.where, index[record.label]))
        report.counts[record.label] = report.counts.get(record.label, 0) + 1
    require_kept(records, out, report, "texts")
    return out, report


def build_labelled_datasets(cfg, tokenizer, configured: list[str] | None) -> tuple[Datasets, list[str]]:
    """The train and eval texts of a classification run (eval from data.eval or data.eval_fraction) and the
    labels, in the order of the head's outputs."""
    fmt, train_records, eval_records = split_items(cfg, load=read_labelled)
    labels, labels_from = label_set(configured, train_records, eval_records)

    def tokenize(tokenizer, records, max_length, policy):
        return tokenize_labelled(tokenizer, records, labels, max_length, policy, labels_from)

    train, evals, train_report, eval_report = tokenize_splits(tokenize, tokenizer, cfg, train_records, eval_records)
    return Datasets(train, evals, [], [], fmt, train_report, eval_report), labels

