"""`--format hf`: the adapter merged into the full-precision base as a plain HF folder; for methods that cannot be
merged, the base as a plain HF folder with the adapter folder kept beside it (`adapter/`)."""

from __future__ import annotations

import shutil
from pathlib import Path

from tunesmith.atomic import atomic_folder
from tunesmith.errors import ModelError, OutputDirError
from tunesmith.infer.adapters import is_adapter_folder, merge_to_folder
from tunesmith.methods import declaration, method_for_adapter
from tunesmith.methods.base import adapter_base

SEPARATE_ADAPTER = "adapter"


def unmergeable_message(source: str, method_name: str, reason: str) -> str:
    return (f"{source}: method {method_name!r} cannot be merged: {reason}. To ship it anyway, export "
            "`--format hf --separate-adapter`: the base as a plain HF folder with the adapter kept beside it in "
            f"{SEPARATE_ADAPTER}/ (load both with --model OUT --adapter OUT/{SEPARATE_ADAPTER})")


def check_mergeable(source: str) -> None:
    """A ModelError offering --separate-adapter when `source` is an adapter of a method that cannot be merged."""
    if not is_adapter_folder(source):
        return
    method_name, _ = method_for_adapter(source)
    why_not = declaration(method_name).not_mergeable
    if why_not:
        raise ModelError(unmergeable_message(source, method_name, why_not))


def export_hf(source: str, out: str, model_path: str | None = None, overwrite: bool = False,
              separate_adapter: bool = False, device: str = "auto") -> Path:
    """`source`: an adapter folder (merged into its base on `device`) or a model (saved as is, never leaving the
    CPU)."""
    from tunesmith.devices import require_device

    require_device(device)  # refused whichever path follows
    dest = Path(out)
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())) and not overwrite:
        raise OutputDirError(f"{dest} already exists and is not empty; pass --overwrite to replace it")
    if not is_adapter_folder(source):
        return _save_plain(source, dest)
    method_name, _ = method_for_adapter(source)
    why_not = declaration(method_name).not_mergeable
    if not why_not:
        return merge_to_folder(source, out, model_path, overwrite=True, device=device)
    if not separate_adapter:
        raise ModelError(unmergeable_message(source, method_name, why_not))
    return _save_plain(adapter_base({"default": source}, model_path), dest, adapter=source)


def _save_plain(model_path: str, dest: Path, adapter: str | None = None) -> Path:
    from tunesmith.infer.adapters import adapter_tokenizer_folder
    from tunesmith.methods.new_tokens import fit_embeddings
    from tunesmith.models import load_model, load_tokenizer

    # an adapter saved with new tokens: the base goes with its tokenizer, resized to it, so PEFT loads the adapter
    grown = adapter_tokenizer_folder({"default": adapter}) if adapter is not None else None
    model, tokenizer = load_model(model_path), load_tokenizer(grown or model_path)
    if grown:
        fit_embeddings(model, tokenizer)
    with atomic_folder(dest) as tmp:
        model.config.use_cache = True
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        if adapter is not None:
            shutil.copytree(adapter, tmp / SEPARATE_ADAPTER)
    return dest
