"""DPO's cached reference log-probs, kept in the run folder so that `--resume` reuses them instead of recomputing.

The file is keyed by what the values depend on: the reference model's weights (hashed as they are when the
reference is computed: untrained), the model's dtype and autocast, the data settings and every pair's tokens. A
resumed run whose key differs (another data set, max_length, template, base model...) recomputes them and says so;
they are never silently applied to pairs they were not computed for.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from tunesmith.atomic import atomic_write_bytes

REFERENCE_FILE = "reference_logps.safetensors"
FORMAT = "tunesmith-dpo-reference-1"


def _hash_tensor(h, name: str, t: torch.Tensor) -> None:
    t = t.detach().cpu().contiguous().reshape(-1)
    h.update(f"{name}:{t.dtype}:{t.numel()};".encode())
    h.update(t.view(torch.uint8).numpy().tobytes())


def reference_key(model: torch.nn.Module, pairs: list, cfg) -> str:
    """A SHA-256 over the reference model's weights, the settings that shape its log-probs and the pairs' tokens."""
    h = hashlib.sha256()
    settings = {"format": FORMAT, "dtype": cfg.weights_dtype, "bf16": cfg.train.bf16,
                "data": cfg.data.model_dump(mode="json")}
    h.update(json.dumps(settings, sort_keys=True).encode())
    for name, p in model.named_parameters():
        _hash_tensor(h, name, p)
    for name, b in model.named_buffers():
        _hash_tensor(h, name, b)
    for pair in pairs:
        h.update(json.dumps([pair.chosen.input_ids, pair.chosen.labels, pair.rejected.input_ids,
                             pair.rejected.labels]).encode())
    return h.hexdigest()


def save_reference(path: Path, key: str, pairs: list) -> None:
    """Every pair's (chosen, rejected) reference log-probs, as float64 (exact), written atomically."""
    from safetensors.torch import save

    logps = torch.tensor([pair.reference_logps for pair in pairs], dtype=torch.float64).reshape(len(pairs), 2)
    atomic_write_bytes(path, save({"reference_logps": logps}, metadata={"key": key, "pairs": str(len(pairs))}))


def load_reference(path: Path, key: str, pairs: list) -> str:
    """Put the cached log-probs on `pairs` when `path` holds them for this key: 'reused'; else 'missing' (no file)
    or 'stale' (made for other data, settings or weights), and the pairs are left alone."""
    from safetensors import SafetensorError, safe_open

    if not path.is_file():
        return "missing"
    try:
        with safe_open(str(path), "pt") as fh:
            metadata = fh.metadata() or {}
            if metadata.get("key") != key or metadata.get("pairs") != str(len(pairs)):
                return "stale"
            logps = fh.get_tensor("reference_logps")
    except (SafetensorError, OSError):  # unreadable: treated like a stale file and rewritten
        return "stale"
    for pair, (chosen, rejected) in zip(pairs, logps.tolist()):
        pair.reference_logps = (chosen, rejected)
    return "reused"
