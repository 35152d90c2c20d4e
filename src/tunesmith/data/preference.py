"""Preference pairs: a prompt with a chosen and a rejected answer → two token sequences that share the prompt.

Accepted records (any file type `data/sources.py` reads):
  {"prompt": "text" | [messages], "chosen": "text" | [assistant turn], "rejected": ..., "margin"?: float}
  {"chosen": [conversation], "rejected": [conversation]}   (the prompt is what the two have in common)
Rendered with the tokenizer's chat template; the answer's tokens, through its end-of-turn token, are the
completion (the only tokens scored); nothing after the end-of-turn token is kept.
"""

from __future__ import annotations

from dataclasses import dataclass

from tunesmith.data.chat import check_chat, read_turns
from tunesmith.data.sources import Record
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


def read_answer(record: Record, key: str) -> str:
    value = record.fields[key]
    if isinstance(value, dict):
        value = [value]
    if isinstance(value, list):
        turns = read_turns(Record({key: value}, record.where), "messages", key, "role", "content")
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


def read_prompt(record: Record) -> list[dict[str, str]]:
    value = record.fields["prompt"]
    if isinstance(value, str):
        if not value.strip():
            raise DataError(f"{record.where}: 'prompt' is empty")
        return [{"role": "user", "content": value}]
    if isinstance(value, list):
        turns = read_turns(record, "messages", "prompt", "role", "content")
        if turns[-1]["role"] == "assistant":
            raise DataError(f"{record.where}: 'prompt' ends with an assistant turn; the answers go in 'chosen' and "
                            "'rejected'")
        return turns
    raise DataError(f"{record.where}: 'prompt' must be text or a list of messages, got {type(value).__name__}")


def _implicit_prompt(record: Record) -> tuple[list[dict], str, str]:
    """Whole conversations in 'chosen' and 'rejected': the prompt is everything but their last assistant turns."""
    chosen = read_turns(record, "messages", "chosen", "role", "content")
    rejected = read_turns(record, "messages", "rejected", "role", "content")
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
        prompt = read_prompt(record)
        chosen = read_answer(record, "chosen") if has["chosen"] else None
        rejected = read_answer(record, "rejected") if has["rejected"] else None
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
        check_chat([*prompt, {"role": "assistant", "content": chosen}], record.where)
    margin = keys.get("margin")
    if margin is not None and not isinstance(margin, (int, float)):
        raise DataError(f"{record.where}: 'margin' must be a number, got {type(margin).__name__}")
    return PreferenceItem(prompt, chosen, rejected, record.where, None if margin is None else float(margin))


def require_answers(items: list[PreferenceItem], objective: str) -> None:
    for item in items:
        if item.chosen is None:
            raise DataError(f"{item.where}: record has a 'prompt' but no 'chosen'/'rejected'; objective "
                            f"'{objective}' learns from pairs of answers")
