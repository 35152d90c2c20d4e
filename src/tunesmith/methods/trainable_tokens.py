"""Only chosen token rows of the embedding train (model.trainable_tokens, and the rows model.add_tokens adds), beside
whatever the method trains: PEFT's trainable tokens (LoraConfig.trainable_token_indices).

The frozen embedding stays as it is; a wrapper holds the chosen rows as a parameter of their own and puts them in place
of the frozen rows wherever those tokens occur. PEFT calls that parameter `token_adapter.trainable_tokens_delta`,
though it holds the rows themselves, not a difference. A head tied to the embedding (SmolLM2) reads the same
parameter for those tokens' logits; an untied head gets its own rows for the same tokens.

Saved into the method's adapter folder in PEFT's layout: adapter_config.json's `trainable_token_indices` (a list of
ids where the head is tied, else {module name: ids} for the embedding and the head) and the rows under
`base_model.model.<module>.token_adapter.trainable_tokens_delta`, beside the grown tokenizer, so that PEFT's
PeftModel loads a LoRA adapter with its rows on a base resized to that tokenizer.
"""

from __future__ import annotations

import shutil
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from tunesmith.atomic import atomic_folder
from tunesmith.errors import ModelError
from tunesmith.methods.base import (ADAPTER_CONFIG, TOKEN_ROWS_KEY, check_and_copy, read_adapter, saved_base,
                                    write_adapter_files)
from tunesmith.surgery import replace_module

CONFIG_KEY = "trainable_token_indices"
ROWS_KEY = TOKEN_ROWS_KEY
PEFT_PREFIX = "base_model.model."


class TokenRows(nn.Module):
    """A frozen embedding (`base_layer`) or output head whose rows `token_indices` come from a trained parameter: its
    own, or, for a head tied to the embedding, the embedding wrapper's (`tied`). With `off` set it is the frozen
    module alone: the rows as they were before training."""

    def __init__(self, base_layer: nn.Module, token_indices: list[int], tied: TokenRows | None = None):
        super().__init__()
        self.base_layer = base_layer
        self.off = False
        self.token_indices = list(token_indices)
        self._tied = [tied] if tied is not None else []  # a list: not registered, so its parameter is counted once
        weight = base_layer.weight
        if tied is None:  # named as PEFT names it: token_adapter.trainable_tokens_delta
            self.token_adapter = nn.Module()
            rows = weight[self.token_indices].detach().float().clone()
            self.token_adapter.trainable_tokens_delta = nn.Parameter(rows)
        self.register_buffer("index", torch.tensor(self.token_indices, device=weight.device), persistent=False)
        slot = torch.full((weight.shape[0],), -1, dtype=torch.long, device=weight.device)
        slot[self.index] = torch.arange(len(self.token_indices), device=weight.device)
        self.register_buffer("slot", slot, persistent=False)

    @property
    def rows(self) -> torch.Tensor:
        return (self._tied[0] if self._tied else self).token_adapter.trainable_tokens_delta

    @property
    def weight(self) -> torch.Tensor:  # shape and dtype probes (check_ids_fit) see the frozen matrix
        return self.base_layer.weight

    def merged_weight(self) -> torch.Tensor:
        w = self.base_layer.weight
        return w.index_copy(0, self.index, self.rows.to(w.dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.off:
            return self.base_layer(x)
        if isinstance(self.base_layer, nn.Embedding):
            return self._embed(x)
        return self._project(x)

    def _embed(self, ids: torch.Tensor) -> torch.Tensor:
        out = self.base_layer(ids)
        slot = self.slot[ids]
        rows = self.rows.to(out.dtype)[slot.clamp(min=0)]
        scale = getattr(self.base_layer, "embed_scale", None)  # Gemma's scaled embedding multiplies in forward
        if isinstance(scale, torch.Tensor):
            rows = rows * scale.to(rows.dtype)
        return torch.where((slot >= 0).unsqueeze(-1), rows, out)

    def _project(self, hidden: torch.Tensor) -> torch.Tensor:
        out = self.base_layer(hidden)
        columns = F.linear(hidden, self.rows.to(hidden.dtype))
        bias = getattr(self.base_layer, "bias", None)
        if bias is not None:
            columns = columns + bias[self.index].to(columns.dtype)
        return out.index_copy(-1, self.index, columns.to(out.dtype))


def _name_of(model: nn.Module, module: nn.Module) -> str:
    return next(n for n, m in model.named_modules() if m is module)


def is_tied(model: nn.Module) -> bool:
    head = model.get_output_embeddings()
    embedding = model.get_input_embeddings()
    base = lambda m: m.base_layer if isinstance(m, TokenRows) else m  # noqa: E731
    return head is not None and base(head).weight is base(embedding).weight


def row_layout(model: nn.Module, ids: list[int]) -> dict[str, list[int]]:
    """{module name: ids} of the rows that train: the input embedding's, and an untied head's too."""
    layout = {_name_of(model, model.get_input_embeddings()): list(ids)}
    head = model.get_output_embeddings()
    if head is not None and not is_tied(model):
        layout[_name_of(model, head)] = list(ids)
    return layout


def apply(model: nn.Module, layout: dict[str, list[int]]) -> dict[str, TokenRows]:
    """Wrap each named module so its rows `ids` train; a head tied to a wrapped embedding reads the embedding's rows.
    Everything else keeps its requires_grad (apply after the method, which freezes the base)."""
    embedding = model.get_input_embeddings()
    head = model.get_output_embeddings()
    tied_head = head is not None and head.weight is embedding.weight
    embedding_name = _name_of(model, embedding)
    head_name = _name_of(model, head) if head is not None else None
    wrappers = {}
    for name, ids in layout.items():
        module = model.get_submodule(name)
        if isinstance(module, TokenRows) or module.weight.requires_grad:
            raise ModelError(f"{name}: its rows cannot train on their own: the method already trains the whole "
                             "matrix (or rows are already chosen); drop model.trainable_tokens")
        wrappers[name] = TokenRows(module, ids)
        replace_module(model, name, wrappers[name])
    if tied_head and embedding_name in layout and head_name not in layout:
        wrappers[head_name] = TokenRows(head, layout[embedding_name], tied=wrappers[embedding_name])
        replace_module(model, head_name, wrappers[head_name])
    return wrappers


def wrappers(model: nn.Module) -> dict[str, TokenRows]:
    return {n: m for n, m in model.named_modules() if isinstance(m, TokenRows)}


@contextmanager
def rows_off(model: nn.Module):
    """Inside the block the frozen rows stand in for the trained ones: the token rows as they were before training."""
    layers = list(wrappers(model).values())
    try:
        for layer in layers:
            layer.off = True
        yield model
    finally:
        for layer in layers:
            layer.off = False


class WithRowsOff:
    """A method whose `disabled(model)` (the reference policy of DPO, KTO, PPO, GRPO: the model before training) also
    switches the trained token rows off; everything else is the method's own."""

    def __init__(self, method):
        self._method = method

    def __getattr__(self, name: str):
        return getattr(self._method, name)

    @contextmanager
    def disabled(self, model: nn.Module):
        with self._method.disabled(model), rows_off(model):
            yield model


def with_rows_off(method):
    """`method`, or where it has a switch to the untrained model, that switch with the token rows off too (a method
    training base weights in place has none: the reference then snapshots the trainable tensors, the rows among them).
    """
    return method if method.disabled is None else WithRowsOff(method)


def peft_entries(model: nn.Module) -> tuple[object, dict[str, torch.Tensor]]:
    """(adapter_config.json's trainable_token_indices, the rows under PEFT's keys) of the model's wrappers."""
    own = {n: w for n, w in wrappers(model).items() if not w._tied}
    tensors = {f"{PEFT_PREFIX}{n}.{ROWS_KEY}": w.rows for n, w in own.items()}
    embedding = _name_of(model, model.get_input_embeddings())
    if list(own) == [embedding]:
        return own[embedding].token_indices, tensors
    return {n: w.token_indices for n, w in own.items()}, tensors


def save_with_artifact(model: nn.Module, tokenizer, folder: str | Path) -> None:
    """Put the grown tokenizer into a saved artifact (an adapter or a model folder), and into an adapter the trained
    rows (PEFT's keys and trainable_token_indices); atomically: the folder is rewritten whole."""
    folder = Path(folder)
    adapter = (folder / ADAPTER_CONFIG).is_file()
    if adapter:
        config, tensors = read_adapter(folder)
        base = saved_base(folder)
    with atomic_folder(folder) as tmp:
        shutil.copytree(folder, tmp, dirs_exist_ok=True)
        if adapter and wrappers(model):
            indices, rows = peft_entries(model)
            config = {**config, CONFIG_KEY: indices, **({"base_model_name_or_path": base} if base else {})}
            kept = {k: v for k, v in tensors.items() if ROWS_KEY not in k}  # a method that saved every trained tensor
            write_adapter_files(tmp, config, {**kept, **rows})
        tokenizer.save_pretrained(tmp)


def layout_from_config(model: nn.Module, config: dict) -> dict[str, list[int]]:
    indices = config.get(CONFIG_KEY)
    if isinstance(indices, dict):
        names = {n for n, _ in model.named_modules()}
        layout = {}
        for key, ids in indices.items():
            found = [n for n in names if n == key or n.endswith("." + key)]
            if len(found) != 1:
                raise ModelError(f"{CONFIG_KEY}: {key!r} names {len(found)} modules of this model, not one")
            layout[found[0]] = list(ids)
        return layout
    return {_name_of(model, model.get_input_embeddings()): list(indices)}


def load(model: nn.Module, folder: str | Path) -> bool:
    """Load the rows a saved adapter holds (ours or PEFT's), if any; the embedding must already have the rows
    (resized to the adapter's tokenizer). Returns whether there were any."""
    config, tensors = read_adapter(folder)
    if config.get(CONFIG_KEY) is None:
        return False
    layout = layout_from_config(model, config)
    rows = model.get_input_embeddings().weight.shape[0]
    top = max((max(ids, default=-1) for ids in layout.values()), default=-1)
    if top >= rows:
        raise ModelError(f"{folder}: {CONFIG_KEY} names token id {top} but the model has {rows} embedding rows; "
                         "load the tokenizer saved with the adapter and resize the base to it")
    apply(model, layout)
    ours = {f"{PEFT_PREFIX}{n}.{ROWS_KEY}": w.rows for n, w in wrappers(model).items() if not w._tied}
    theirs = {k.replace(f".{ROWS_KEY}.default", f".{ROWS_KEY}"): v for k, v in tensors.items() if ROWS_KEY in k}
    check_and_copy(folder, ours, theirs)
    for p in ours.values():
        p.requires_grad_(False)
    return True


@torch.no_grad()
def merge_and_unload(model: nn.Module) -> None:
    """Fold the trained rows into the embedding (and an untied head) and remove the wrappers."""
    for name, wrapper in wrappers(model).items():
        base = wrapper.base_layer
        if not wrapper._tied:
            base.weight.index_copy_(0, wrapper.index, wrapper.rows.to(base.weight.dtype))
        replace_module(model, name, base)


def apply_for_run(model: nn.Module, tokenizer, added_ids: list[int], tokens: list[str | int] | None,
                  method) -> list[int]:
    """After the method (settings `method`): the rows of the added tokens and of `tokens` (model.trainable_tokens)
    train, unless the method trains the whole model (then they train anyway). Returns the ids whose rows train on
    their own."""
    from tunesmith.methods.new_tokens import token_ids

    if method.declaration.parameters == "whole":
        return []
    ids = sorted(set(added_ids) | set(token_ids(tokenizer, tokens or [])))
    if ids:
        apply(model, row_layout(model, ids))
    return ids
