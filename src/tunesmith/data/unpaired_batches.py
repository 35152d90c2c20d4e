"""Unpaired examples (KTO) as tensors: each completion tokenized after its prompt as a preference answer is
(data/pair_batches.py, the same length policy), and batches holding the examples and, under `KL_PREFIX`, their
mismatched sequences (data/unpaired.py) that KTO estimates its KL term from."""

from __future__ import annotations

import torch

from tunesmith.data.chat import IGNORE
from tunesmith.data.pair_batches import collate_sequences, fit_length, require_kept, tokenize_answer, tokenize_splits
from tunesmith.data.pipeline import Datasets, split_items
from tunesmith.data.templates import LengthReport
from tunesmith.data.unpaired import TokenizedUnpaired, mismatched, unpair
from tunesmith.errors import DataError

KL_PREFIX = "kl_"
MIN_LABELS = 2  # a cut completion keeps two predicted tokens or is dropped (KTO's rule since it was written)


def tokenize_unpaired(tokenizer, items: list, max_length: int, policy: str
                      ) -> tuple[list[TokenizedUnpaired], LengthReport]:
    report = LengthReport(policy, max_length)
    out = []
    for item in items:
        seq = tokenize_answer(tokenizer, item.prompt, item.completion, item.where)
        prompt_length = next(i for i, t in enumerate(seq.labels) if t != IGNORE)
        fitted = fit_length((seq,), max_length, policy, report, MIN_LABELS)
        if fitted is not None:
            out.append(TokenizedUnpaired(fitted[0], prompt_length, item.label, item.where))
    require_kept(items, out, report, "KTO examples")
    return out, report


def build_unpaired_datasets(cfg, tokenizer) -> Datasets:
    """The `Datasets` of KTO: unpaired items (preference pairs split in two), tokenized; at least 2 to train on."""
    fmt, train_items, eval_items = split_items(cfg)
    train_items, eval_items = unpair(train_items), unpair(eval_items)
    train, evals, train_report, eval_report = tokenize_splits(tokenize_unpaired, tokenizer, cfg, train_items,
                                                              eval_items)
    if len(train) < 2:
        raise DataError(f"data.train: KTO needs at least 2 examples (its KL estimate pairs each prompt with "
                        f"another example's completion); {len(train)} left")
    return Datasets(train, evals, train_items, eval_items, fmt, train_report, eval_report)


def collate_unpaired(examples: list[TokenizedUnpaired], packing: bool, capacity: int, pad_id: int,
                     share_prefixes: bool = True) -> dict[str, torch.Tensor]:
    """The examples' batch, their mismatched sequences' batch with its keys under KL_PREFIX, and `label`."""
    args = (packing, capacity, pad_id, share_prefixes)
    batch = collate_sequences([ex.sequence for ex in examples], *args)
    kl = collate_sequences(mismatched(examples), *args)
    return {**batch, **{KL_PREFIX + k: v for k, v in kl.items()},
            "label": torch.tensor([ex.label for ex in examples], dtype=torch.bool)}
