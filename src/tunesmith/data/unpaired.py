"""Unpaired examples (KTO): a prompt, one completion, and a label saying whether that completion is desirable.

Accepted records (any file type `data/sources.py` reads):
  {"prompt": "text" | [messages], "completion": "text" | [one assistant turn], "label": true | false}
  preference pairs {"prompt", "chosen", "rejected"}: each becomes two examples, chosen (true) and rejected (false),
  as TRL's `unpair_preference_dataset` does
Rendered with the tokenizer's chat template like a preference answer: the completion's tokens through its end-of-turn
token are the ones scored.
"""

from __future__ import annotations

from dataclasses import dataclass

from tunesmith.data.chat import EXPECTED, Tokenized
from tunesmith.data.preference import PreferenceItem, read_answer, read_prompt
from tunesmith.data.sources import Record
from tunesmith.errors import DataError

FORMAT_HELP = f"unpaired format expects {EXPECTED['unpaired']}"


@dataclass
class UnpairedItem:
    prompt: list[dict[str, str]]
    completion: str
    label: bool
    where: str

    @property
    def chosen(self) -> str | None:  # the answer sample generations show as the reference
        return self.completion if self.label else None


def normalize_unpaired(record: Record, system_prompt: str | None = None) -> UnpairedItem:
    fields = record.fields
    for key in ("prompt", "completion", "label"):
        if fields.get(key) is None:
            extra = (" ('chosen'/'rejected' pairs are accepted too, but a file holds one format)"
                     if "chosen" in fields or "rejected" in fields else "")
            raise DataError(f"{record.where}: record is missing '{key}' ({FORMAT_HELP}){extra}")
    label = fields["label"]
    if not isinstance(label, bool):
        raise DataError(f"{record.where}: 'label' must be true or false (desirable or not), got {label!r}")
    prompt = read_prompt(record)
    completion = read_answer(record, "completion")
    if system_prompt and prompt[0]["role"] != "system":
        prompt = [{"role": "system", "content": system_prompt}, *prompt]
    return UnpairedItem(prompt, completion, label, record.where)


def unpair(items: list) -> list[UnpairedItem]:
    """Preference pairs → two unpaired examples each (chosen: desirable, rejected: undesirable); others unchanged."""
    out = []
    for item in items:
        if isinstance(item, PreferenceItem):
            if item.chosen is None:
                raise DataError(f"{item.where}: record has a 'prompt' but no 'chosen'/'rejected' (nor 'completion' "
                                f"and 'label'); objective 'kto' learns from labelled completions ({FORMAT_HELP})")
            out += [UnpairedItem(item.prompt, item.chosen, True, item.where),
                    UnpairedItem(item.prompt, item.rejected, False, item.where)]
        else:
            out.append(item)
    return out


@dataclass
class TokenizedUnpaired:
    sequence: Tokenized
    prompt_length: int  # tokens before the completion
    label: bool
    where: str

    def __len__(self) -> int:
        return len(self.sequence)

    @property
    def n_labels(self) -> int:
        return self.sequence.n_labels


def mismatched(examples: list[TokenizedUnpaired]) -> list[Tokenized]:
    """Each example's prompt with the previous example's completion (the last one's for the first), the sequences
    KTO estimates its KL term from: (x_1, y_n), (x_2, y_1), ..., (x_n, y_{n-1}), as TRL builds them."""
    out = []
    for i, ex in enumerate(examples):
        other = examples[i - 1].sequence
        start = examples[i - 1].prompt_length
        prompt = ex.sequence.input_ids[: ex.prompt_length]
        completion = other.input_ids[start:]
        ignore = ex.sequence.labels[: ex.prompt_length]
        out.append(Tokenized(prompt + completion, ignore + completion, ex.where))
    return out
