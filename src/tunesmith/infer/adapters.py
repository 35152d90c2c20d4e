"""Base model + adapter for inference, and merging an adapter into a plain HF model folder."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from tunesmith.config import DEFAULT_MODEL
from tunesmith.errors import OutputDirError
from tunesmith.methods.base import read_adapter


def adapter_base(adapter: str | None, model: str | None) -> str:
    if model:
        return model
    if adapter:
        config, _ = read_adapter(adapter)
        return config.get("base_model_name_or_path") or DEFAULT_MODEL
    return DEFAULT_MODEL


def load_with_adapter(model_path: str | None, adapter: str | None, dtype: str = "float32",
                      trust_remote_code: bool = False):
    from tunesmith.methods import lora
    from tunesmith.models import load_model, load_tokenizer

    base = adapter_base(adapter, model_path)
    model = load_model(base, dtype, trust_remote_code)
    tokenizer = load_tokenizer(base, trust_remote_code)
    if adapter:
        lora.load(model, adapter)
    model.eval()
    return model, tokenizer


def merge_to_folder(adapter: str, out: str, model_path: str | None = None, overwrite: bool = False) -> Path:
    """Merge into the full-precision base and save with save_pretrained (safetensors), atomically."""
    from tunesmith.methods import lora

    dest = Path(out)
    if dest.exists() and any(dest.iterdir()) and not overwrite:
        raise OutputDirError(f"{dest} already exists and is not empty; pass --overwrite to replace it")
    model, tokenizer = load_with_adapter(model_path, adapter)
    lora.merge(model)
    lora.unload(model)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}-", dir=dest.parent))
    try:
        model.config.use_cache = True
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        tmp.chmod(0o755)
        if dest.exists():
            shutil.rmtree(dest)
        os.replace(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dest
