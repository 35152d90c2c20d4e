"""Every token id a run feeds the model has an embedding row: a tokenizer of another model (or a model whose
vocabulary was cut) gives ids past the embedding, which PyTorch reports only as "index out of range in self" from
inside the first forward pass."""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from tunesmith.errors import ModelError


def _id_lists(example) -> Iterator[list[int]]:
    for name in ("input_ids", "ids"):  # a tokenized example, a prompt
        ids = getattr(example, name, None)
        if ids is not None:
            yield ids
    for name in ("chosen", "rejected", "sequence"):  # a pair's two sides, an unpaired example
        ids = getattr(getattr(example, name, None), "input_ids", None)
        if ids is not None:
            yield ids


def check_ids_fit(model, model_path: str, examples: dict[str, Iterable]) -> None:
    """Raise a ModelError naming the first example (file:line) whose token ids the model has no embedding for."""
    rows = model.get_input_embeddings().weight.shape[0]
    for what, items in examples.items():
        for example in items:
            for ids in _id_lists(example):
                top = max(ids, default=-1)
                if top >= rows:
                    raise ModelError(
                        f"{getattr(example, 'where', '') or what} ({what}): token id {top} but the model "
                        f"({model_path}) has {rows} embedding rows: the tokenizer is not this model's (or the "
                        f"model's vocabulary was cut); give model.path a folder whose tokenizer and weights belong "
                        f"together")
