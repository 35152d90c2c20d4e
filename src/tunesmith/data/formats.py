"""Record formats (alpaca, sharegpt, messages, text) → one normal form: a chat or a document."""

from __future__ import annotations

from tunesmith.data.chat import EXPECTED, Chat, Document, check_chat, read_turns
from tunesmith.data.preference import normalize_pair
from tunesmith.data.sources import Record
from tunesmith.data.unpaired import normalize_unpaired
from tunesmith.errors import DataError

FORMATS = ("alpaca", "sharegpt", "messages", "text", "preference", "unpaired")



def detect_format(record: Record) -> str:
    keys = set(record.fields)
    if "completion" in keys or "label" in keys:
        return "unpaired"
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


def normalize(record: Record, fmt: str, system_prompt: str | None = None) -> Chat | Document:
    if fmt == "preference":
        return normalize_pair(record, system_prompt)
    if fmt == "unpaired":
        return normalize_unpaired(record, system_prompt)
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
        messages = read_turns(record, fmt, "conversations", "from", "value")
    elif fmt == "messages":
        messages = read_turns(record, fmt, "messages", "role", "content")
    else:
        raise DataError(f"data.format: unknown format {fmt!r}; expected one of {FORMATS}")
    if system_prompt and messages[0]["role"] != "system":
        messages.insert(0, {"role": "system", "content": system_prompt})
    check_chat(messages, record.where)
    return Chat(messages, record.where)


def normalize_all(records: list[Record], fmt: str = "auto", system_prompt: str | None = None) -> tuple[str, list]:
    if not records:
        return fmt, []
    if fmt == "auto":
        fmt = detect_format(records[0])
    return fmt, [normalize(r, fmt, system_prompt) for r in records]
