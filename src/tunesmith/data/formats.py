"""Record formats (alpaca, sharegpt, messages, text) → one normal form: a chat or a document."""

from __future__ import annotations

from dataclasses import dataclass

from tunesmith.data.sources import Record
from tunesmith.errors import DataError

FORMATS = ("alpaca", "sharegpt", "messages", "text", "preference")
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system",
                  "chatgpt": "assistant", "bot": "assistant"}
EXPECTED = {
    "alpaca": "'instruction', optional 'input', 'output'",
    "sharegpt": "'conversations': a list of {'from', 'value'}",
    "messages": "'messages': a list of {'role', 'content'}",
    "text": "'text': a string",
    "preference": "'prompt' (text or messages), 'chosen' and 'rejected' (text or assistant turns); or 'chosen' and "
                  "'rejected' as whole conversations that differ only in the last assistant turn",
}


@dataclass
class Chat:
    messages: list[dict[str, str]]
    where: str


@dataclass
class Document:
    text: str
    where: str


def detect_format(record: Record) -> str:
    keys = set(record.fields)
    if "chosen" in keys or "rejected" in keys or "prompt" in keys:
        return "preference"
    if "messages" in keys:
        return "messages"
    if "conversations" in keys:
        return "sharegpt"
    if "instruction" in keys or "output" in keys:
        return "alpaca"
    if "text" in keys:
        return "text"
    raise DataError(
        f"{record.where}: cannot tell the data format from the keys {sorted(keys)}; expected one of: "
        + "; ".join(f"{k} ({v})" for k, v in EXPECTED.items())
        + ". Set data.format to say which."
    )


def _need_str(record: Record, key: str, fmt: str, allow_empty: bool = False) -> str:
    if key not in record.fields or record.fields[key] is None:
        raise DataError(f"{record.where}: record is missing '{key}' ({fmt} format expects {EXPECTED[fmt]})")
    value = record.fields[key]
    if not isinstance(value, str):
        raise DataError(f"{record.where}: '{key}' must be a string, got {type(value).__name__}")
    if not allow_empty and not value.strip():
        raise DataError(f"{record.where}: '{key}' is empty")
    return value


def _check_chat(messages: list[dict[str, str]], where: str) -> None:
    if not any(m["role"] == "assistant" for m in messages):
        raise DataError(f"{where}: the conversation has no assistant turn, so nothing would be learned from it")
    for i, m in enumerate(messages):
        if m["role"] == "assistant" and not m["content"].strip():
            raise DataError(f"{where}: turn {i} is an empty assistant turn; remove the record or fill in the answer")
        if m["role"] == "system" and i != 0:
            raise DataError(f"{where}: turn {i} is a system message; only the first turn may be one")


def _turns(record: Record, fmt: str, key: str, role_key: str, text_key: str) -> list[dict[str, str]]:
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


def normalize(record: Record, fmt: str, system_prompt: str | None = None) -> Chat | Document:
    if fmt == "preference":
        from tunesmith.data.preference import normalize_pair

        return normalize_pair(record, system_prompt)
    if fmt == "text":
        return Document(_need_str(record, "text", fmt), record.where)
    if fmt == "alpaca":
        instruction = _need_str(record, "instruction", fmt)
        extra = record.fields.get("input") or ""
        if not isinstance(extra, str):
            raise DataError(f"{record.where}: 'input' must be a string, got {type(extra).__name__}")
        output = _need_str(record, "output", fmt, allow_empty=True)
        user = instruction if not extra.strip() else f"{instruction}\n\n{extra}"
        messages = [{"role": "user", "content": user}, {"role": "assistant", "content": output}]
        system = record.fields.get("system")
        if isinstance(system, str) and system.strip():
            messages.insert(0, {"role": "system", "content": system})
    elif fmt == "sharegpt":
        messages = _turns(record, fmt, "conversations", "from", "value")
    elif fmt == "messages":
        messages = _turns(record, fmt, "messages", "role", "content")
    else:
        raise DataError(f"data.format: unknown format {fmt!r}; expected one of {FORMATS}")
    if system_prompt and messages[0]["role"] != "system":
        messages.insert(0, {"role": "system", "content": system_prompt})
    _check_chat(messages, record.where)
    return Chat(messages, record.where)


def normalize_all(records: list[Record], fmt: str = "auto", system_prompt: str | None = None) -> tuple[str, list]:
    if not records:
        return fmt, []
    if fmt == "auto":
        fmt = detect_format(records[0])
    return fmt, [normalize(r, fmt, system_prompt) for r in records]
