"""The primitives every data module shares: chats and documents, token ids with labels, the chat template, and the
character spans of assistant turns that labels are placed on."""

from __future__ import annotations

from dataclasses import dataclass

from tunesmith.data.sources import Record
from tunesmith.errors import DataError

IGNORE = -100
FALLBACK_CHATML = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system",
                  "chatgpt": "assistant", "bot": "assistant"}
EXPECTED = {
    "alpaca": "'instruction', optional 'input', 'output'",
    "sharegpt": "'conversations': a list of {'from', 'value'}",
    "messages": "'messages': a list of {'role', 'content'}",
    "text": "'text': a string",
    "preference": "'prompt' (text or messages), 'chosen' and 'rejected' (text or assistant turns); or 'chosen' and "
                  "'rejected' as whole conversations that differ only in the last assistant turn",
    "unpaired": "'prompt' (text or messages), 'completion' (text or one assistant turn) and 'label' (true: "
                "desirable, false: undesirable)",
}


@dataclass
class Chat:
    messages: list[dict[str, str]]
    where: str


@dataclass
class Document:
    text: str
    where: str


@dataclass
class Tokenized:
    input_ids: list[int]
    labels: list[int]
    where: str = ""

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def n_labels(self) -> int:
        """How many tokens are predicted: labels after the first position (nothing predicts the first token)."""
        return sum(1 for x in self.labels[1:] if x != IGNORE)


def check_chat(messages: list[dict[str, str]], where: str) -> None:
    """A conversation to learn from: at least one non-empty assistant turn, a system message only first."""
    if not any(m["role"] == "assistant" for m in messages):
        raise DataError(f"{where}: the conversation has no assistant turn, so nothing would be learned from it")
    for i, m in enumerate(messages):
        if m["role"] == "assistant" and not m["content"].strip():
            raise DataError(f"{where}: turn {i} is an empty assistant turn; remove the record or fill in the answer")
        if m["role"] == "system" and i != 0:
            raise DataError(f"{where}: turn {i} is a system message; only the first turn may be one")


def read_turns(record: Record, fmt: str, key: str, role_key: str, text_key: str) -> list[dict[str, str]]:
    """record[key] as chat messages: a list of {role_key, text_key} objects, sharegpt roles mapped to ours."""
    turns = record.fields.get(key)
    if not isinstance(turns, list) or not turns:
        raise DataError(f"{record.where}: '{key}' must be a non-empty list ({fmt} format expects {EXPECTED[fmt]})")
    out = []
    for i, t in enumerate(turns):
        if not isinstance(t, dict) or role_key not in t or text_key not in t:
            raise DataError(f"{record.where}: {key}[{i}] must be an object with '{role_key}' and '{text_key}'")
        role, text = t[role_key], t[text_key]
        if fmt == "sharegpt":
            if role not in SHAREGPT_ROLES:
                raise DataError(f"{record.where}: {key}[{i}].from is {role!r}; expected one of {sorted(SHAREGPT_ROLES)}")
            role = SHAREGPT_ROLES[role]
        elif role not in ("system", "user", "assistant"):
            raise DataError(f"{record.where}: {key}[{i}].role is {role!r}; expected system, user or assistant")
        if not isinstance(text, str):
            raise DataError(f"{record.where}: {key}[{i}].{text_key} must be a string, got {type(text).__name__}")
        out.append({"role": role, "content": text})
    return out


def ensure_chat_template(tokenizer) -> None:
    if not getattr(tokenizer, "chat_template", None):
        tokenizer.chat_template = FALLBACK_CHATML


def render(tokenizer, messages: list[dict], add_generation_prompt: bool = False) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def assistant_spans(tokenizer, chat: Chat) -> tuple[str, list[tuple[int, int]]]:
    """The rendered text and the character span of each assistant turn, through its end-of-turn token."""
    text = render(tokenizer, chat.messages)
    eot = tokenizer.eos_token or ""
    spans = []
    for i, m in enumerate(chat.messages):
        if m["role"] != "assistant":
            continue
        before = render(tokenizer, chat.messages[:i], add_generation_prompt=True) if i else ""
        through = render(tokenizer, chat.messages[: i + 1])
        if not (text.startswith(through) and through.startswith(before)):
            raise DataError(
                f"{chat.where}: the tokenizer's chat template does not render conversations as a prefix of longer "
                "ones, so assistant turns cannot be located; use a template without per-turn rewriting"
            )
        start, end = len(before), len(through)
        cut = through.rfind(eot, start, end) if eot else -1
        if cut >= 0:
            end = cut + len(eot)
        spans.append((start, end))
    return text, spans
