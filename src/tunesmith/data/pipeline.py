"""Read → validate → normalise → tokenize → length policy, for the train and eval sets of a run."""

from __future__ import annotations

import random
from dataclasses import dataclass

from tunesmith.config import RunConfig
from tunesmith.data.chat import Chat, Tokenized
from tunesmith.data.formats import normalize_all
from tunesmith.data.sources import read_many
from tunesmith.data.templates import LengthReport, apply_length_policy, tokenize_all
from tunesmith.errors import DataError

PROMPTS = ("preference", "alpaca", "sharegpt", "messages", "unpaired")
OBJECTIVE_FORMATS = {"sft": ("alpaca", "sharegpt", "messages"), "text": ("text",), "reward": ("preference",),
                     "dpo": ("preference",), "orpo": ("preference",), "simpo": ("preference",),
                     "kto": ("unpaired", "preference"), "ppo": PROMPTS, "grpo": PROMPTS}
DESCRIBED = {"text": " (raw documents with a 'text' field)", "sft": " (conversations)",
             "reward": " (prompt, chosen, rejected)", "dpo": " (prompt, chosen, rejected)",
             "orpo": " (prompt, chosen, rejected)", "simpo": " (prompt, chosen, rejected)",
             "kto": " (prompt, completion, label; or prompt, chosen, rejected: each pair becomes two examples)",
             "ppo": " (prompts: 'prompt' records or conversations)",
             "grpo": " (prompts: 'prompt' records or conversations)"}


@dataclass
class Datasets:
    train: list[Tokenized]
    eval: list[Tokenized]
    train_items: list  # normalised chats/documents, for sample generations
    eval_items: list
    format: str
    train_report: LengthReport
    eval_report: LengthReport | None


def load_items(paths, cfg: RunConfig, field: str) -> tuple[str, list]:
    fmt, items = normalize_all(read_many(paths), cfg.data.format, cfg.data.system_prompt)
    allowed = OBJECTIVE_FORMATS[cfg.objective]
    if fmt not in allowed:
        raise DataError(
            f"{field}: the data is in '{fmt}' format but objective '{cfg.objective}' expects {' or '.join(allowed)}"
            + DESCRIBED[cfg.objective]
        )
    return fmt, items


def split_items(cfg: RunConfig) -> tuple[str, list, list]:
    """The normalised train and eval items: eval from its own file, a held-out fraction, or none; both capped."""
    fmt, train_items = load_items(cfg.data.train, cfg, "data.train")
    if cfg.data.max_examples:
        train_items = train_items[: cfg.data.max_examples]
    if cfg.data.eval:
        _, eval_items = load_items(cfg.data.eval, cfg, "data.eval")
    elif cfg.data.eval_fraction > 0:
        rng = random.Random(cfg.train.seed)
        order = list(range(len(train_items)))
        rng.shuffle(order)
        n_eval = max(1, int(round(len(order) * cfg.data.eval_fraction)))
        if n_eval >= len(order):
            raise DataError(f"data.eval_fraction: {cfg.data.eval_fraction} of the {len(order)} records in data.train "
                            f"holds out {n_eval}, leaving none to train on; lower it or give a data.eval file")
        held = set(order[:n_eval])
        eval_items = [x for i, x in enumerate(train_items) if i in held]
        train_items = [x for i, x in enumerate(train_items) if i not in held]
    else:
        eval_items = []
    if cfg.data.max_eval_examples:
        eval_items = eval_items[: cfg.data.max_eval_examples]
    return fmt, train_items, eval_items


def build_datasets(cfg: RunConfig, tokenizer) -> Datasets:
    fmt, train_items, eval_items = split_items(cfg)
    train, train_report = apply_length_policy(
        tokenize_all(tokenizer, train_items, cfg.data.train_on_prompt), cfg.data.max_length, cfg.overlong
    )
    eval_report = None
    evals: list[Tokenized] = []
    if eval_items:
        evals, eval_report = apply_length_policy(
            tokenize_all(tokenizer, eval_items, cfg.data.train_on_prompt), cfg.data.max_length, cfg.overlong
        )
    return Datasets(train, evals, train_items, eval_items, fmt, train_report, eval_report)


def prompt_and_answer(item) -> tuple[list[dict], str] | None:
    """Split a chat at its last assistant turn, for sample generations (a preference item: its prompt and its
    chosen answer)."""
    prompt = getattr(item, "prompt", None)
    if isinstance(prompt, list):
        return prompt, item.chosen or ""
    if not isinstance(item, Chat):
        return None
    last = max(i for i, m in enumerate(item.messages) if m["role"] == "assistant")
    return item.messages[:last], item.messages[last]["content"]
