"""Linear heads on the causal LM's last hidden state at each sequence's last real token (the reward model's scalar
head, the classifier's label head): made beside the LM, read at `batch["last"]`, kept out of the method's files and
stored as their own safetensors file."""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from tunesmith.atomic import atomic_write_bytes
from tunesmith.context import RunContext
from tunesmith.errors import ModelError
from tunesmith.objectives.lm import hidden_states


def attach_head(model: nn.Module, attr: str, outputs: int) -> nn.Linear:
    """A fresh head (fp32, no bias, N(0, 1/hidden)) registered on the model as the submodule `attr` (a plain name,
    no prefix), so the optimizer, checkpoints, parameter counts, `.to(device)` and the DDP/FSDP wrapper (whose
    gradient sync covers the wrapped model's parameters) see it."""
    weight = model.get_input_embeddings().weight
    hidden = weight.shape[1]
    head = nn.Linear(hidden, outputs, bias=False, device=weight.device, dtype=torch.float32)
    nn.init.normal_(head.weight, std=hidden ** -0.5)
    setattr(model, attr, head)
    return head


def last_token_outputs(model: nn.Module, head: nn.Linear, batch: dict[str, torch.Tensor], ctx: RunContext
                       ) -> torch.Tensor:
    """The head on the hidden state of each sequence's last token (batch["last"], from the lengths), fp32 (S, outputs)."""
    hidden = hidden_states(model, batch, ctx)
    last = hidden.reshape(-1, hidden.shape[-1])[batch["last"]]
    if not torch.is_autocast_enabled(last.device.type):
        last = last.to(head.weight.dtype)
    return head(last).float()


@contextmanager
def set_aside(model: nn.Module, attr: str):
    """Inside the block the model has no head, so the method's files (a full model's state dict) leave it out."""
    head = getattr(model, attr)
    setattr(model, attr, None)
    try:
        yield head
    finally:
        setattr(model, attr, head)


def write_head(path: Path, head: nn.Linear, metadata: dict[str, str]) -> Path:
    """The head's weight as a safetensors file, written atomically (temp file, fsync, rename)."""
    from safetensors.torch import save

    atomic_write_bytes(path, save({"weight": head.weight.detach().float().cpu().contiguous()},
                                  metadata={"format": "pt", "pooling": "last_token",
                                            "hidden_size": str(head.in_features), **metadata}))
    return path


def read_head(path: Path, model: nn.Module, attr: str, outputs: int, missing: str) -> nn.Linear:
    """A head attached to `model` with the weight saved at `path`; `missing` says what the folder is not."""
    from safetensors import safe_open

    if not path.is_file():
        raise ModelError(f"{path.parent}: no {path.name} here, so it is not {missing}")
    with safe_open(str(path), "pt") as fh:
        weight = fh.get_tensor("weight")
    head = attach_head(model, attr, outputs)
    if weight.shape != head.weight.shape:
        raise ModelError(f"{path}: head of shape {tuple(weight.shape)}, but this model with {outputs} output(s) "
                         f"needs {tuple(head.weight.shape)} (made for a different base?)")
    with torch.no_grad():
        head.weight.copy_(weight)
    return head


def load_trained(folder, base: str | None, dtype: str, trust_remote_code: bool, what: str):
    """(model, tokenizer, context) of a run's saved artifact without its head: an adapter folder (on its base, or
    `base`) or a model folder; the context carries the adapter's virtual tokens, if its method has them."""
    from tunesmith.infer.adapters import adapter_context, is_adapter_folder, load_with_adapter
    from tunesmith.models import load_model, load_tokenizer

    folder = Path(folder)
    if not folder.is_dir():
        raise ModelError(f"{folder}: {what} folder not found")
    if is_adapter_folder(folder):
        return (*load_with_adapter(base, str(folder), dtype, trust_remote_code), adapter_context(str(folder)))
    return (load_model(str(folder), dtype, trust_remote_code), load_tokenizer(str(folder), trust_remote_code),
            RunContext())
