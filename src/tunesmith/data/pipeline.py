"""Read → validate → normalise → tokenize → length policy, for the train and eval sets of a run."""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from tunesmith.config import RunConfig
from tunesmith.data.chat import Chat, Document, Tokenized
from tunesmith.data.formats import normalize_all
from tunesmith.data.mixture import ExampleStream, MixtureStream, TaskSlice, mixture_weights
from tunesmith.data.sources import read_many
from tunesmith.data.templates import LengthReport, apply_length_policy, tokenize_all
from tunesmith.errors import DataError

@dataclass
class Datasets:
    train: list[Tokenized]
    eval: list[Tokenized]
    train_items: list  # normalised chats/documents, for sample generations
    eval_items: list
    format: str
    train_report: LengthReport
    eval_report: LengthReport | None
    tasks: list[TaskSlice] = field(default_factory=list)  # multi-task runs: where each task sits in `train`
    task_evals: dict[str, list[Tokenized]] = field(default_factory=dict)

    def stream(self, seed: int, position: int = 0):
        """The resumable order of training examples: `take(k)` gives the next k indices into `train`."""
        if self.tasks:
            return MixtureStream(self.tasks, seed, position)
        return ExampleStream(len(self.train), seed, position)

    def sampled_mixture(self, stream) -> dict[str, float]:
        """Each task's share of the examples the stream has given (empty for one data set)."""
        return stream.shares() if self.tasks else {}


def load_items(paths, cfg: RunConfig, field: str, fmt: str | None = None, system_prompt: str | None = None
               ) -> tuple[str, list]:
    fmt, items = normalize_all(read_many(paths), fmt or cfg.data.format,
                               system_prompt if fmt is not None else cfg.data.system_prompt)
    declared = cfg.objective_declaration
    allowed = declared.formats + (declared.task_formats if cfg.data.tasks else ())
    if fmt not in allowed:
        raise DataError(
            f"{field}: the data is in '{fmt}' format but objective '{cfg.objective}' expects {' or '.join(allowed)}"
            + declared.described
        )
    return fmt, items


def split_items(cfg: RunConfig, task=None, where: str = "data", load=load_items) -> tuple[str, list, list]:
    """The normalised train and eval items (of data.train, or of one of data.tasks): eval from its own file, a
    held-out fraction, or none; both capped. `load` reads and checks one set (load_items' signature)."""
    source = task or cfg.data
    fmt_of = (task.format, task.system_prompt or cfg.data.system_prompt) if task else (None, None)
    fmt, train_items = load(source.train, cfg, f"{where}.train", *fmt_of)
    if cfg.data.max_examples:
        train_items = train_items[: cfg.data.max_examples]
    if source.eval:
        _, eval_items = load(source.eval, cfg, f"{where}.eval", *fmt_of)
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


def _tokenized(cfg: RunConfig, tokenizer, items: list) -> tuple[list[Tokenized], LengthReport]:
    return apply_length_policy(tokenize_all(tokenizer, items, cfg.data.train_on_prompt), cfg.data.max_length,
                               cfg.overlong)


def build_datasets(cfg: RunConfig, tokenizer) -> Datasets:
    if cfg.data.tasks:
        return build_task_mixture(cfg, tokenizer)
    fmt, train_items, eval_items = split_items(cfg)
    train, train_report = _tokenized(cfg, tokenizer, train_items)
    evals, eval_report = _tokenized(cfg, tokenizer, eval_items) if eval_items else ([], None)
    return Datasets(train, evals, train_items, eval_items, fmt, train_report, eval_report)


def with_prefix(item, prefix: str | None):
    """The item with `prefix` put before each user turn (before a document's text)."""
    if not prefix:
        return item
    if isinstance(item, Document):
        return Document(f"{prefix}\n\n{item.text}", item.where)
    messages = [{**m, "content": f"{prefix}\n\n{m['content']}"} if m["role"] == "user" else m
                for m in item.messages]
    return Chat(messages, item.where)


def build_task_mixture(cfg: RunConfig, tokenizer) -> Datasets:
    """data.tasks: each task read with its own format, system prompt and instruction prefix, tokenized and
    concatenated into one train list; the mixture weights say how often each task's examples come next."""
    train, evals, train_items, eval_items, sizes, task_evals, formats = [], [], [], [], [], {}, []
    train_report = eval_report = None
    for i, task in enumerate(cfg.data.tasks):
        fmt, task_train, task_eval = split_items(cfg, task, f"data.tasks.{i}")
        task_train = [with_prefix(x, task.instruction_prefix) for x in task_train]
        task_eval = [with_prefix(x, task.instruction_prefix) for x in task_eval]
        examples, report = _tokenized(cfg, tokenizer, task_train)
        if not examples:
            raise DataError(f"data.tasks.{i}.train: task {task.name!r} has no training example left "
                            f"({report.summary()})")
        train_report = report if train_report is None else train_report.merged(report)
        held, held_report = _tokenized(cfg, tokenizer, task_eval) if task_eval else ([], None)
        if held_report is not None:
            eval_report = held_report if eval_report is None else eval_report.merged(held_report)
            task_evals[task.name] = held
        sizes.append(len(examples))
        formats.append(fmt)
        train += examples
        evals += held
        train_items += task_train
        eval_items += task_eval
    weights = mixture_weights(cfg.data.mixture.kind, sizes, cfg.data.task_weights(), cfg.data.mixture.temperature)
    offsets = [sum(sizes[:i]) for i in range(len(sizes))]
    tasks = [TaskSlice(t.name, offset, size, w) for t, offset, size, w in zip(cfg.data.tasks, offsets, sizes, weights)]
    fmt = formats[0] if len(set(formats)) == 1 else "+".join(formats)
    return Datasets(train, evals, train_items, eval_items, fmt, train_report, eval_report, tasks, task_evals)


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
