"""A RAG index on disk: vectors.faiss (inner product over unit vectors), chunks.jsonl, manifest.json.

The manifest records the embedding model (name, dimension), the chunk settings and every indexed file's
SHA-256, so an unchanged file is skipped, a changed one replaced, and a different embedding model refused.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from tunesmith.atomic import atomic_folder
from tunesmith.errors import ConfigError, DataError
from tunesmith.rag.chunking import check_chunk_settings, chunk_text
from tunesmith.rag.documents import Collected, Skipped

INDEX_FORMAT = "tunesmith-rag-index"
INDEX_VERSION = 1
MANIFEST, CHUNKS, VECTORS = "manifest.json", "chunks.jsonl", "vectors.faiss"


@dataclass
class IndexReport:
    added: list[str] = field(default_factory=list)
    updated: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)
    chunks_added: int = 0


@dataclass
class RagIndex:
    manifest: dict
    chunks: list[dict]
    vectors: object  # faiss.IndexFlatIP

    @classmethod
    def new(cls, embedding_model: str, dim: int, chunk_tokens: int, overlap_tokens: int) -> "RagIndex":
        import faiss

        manifest = {"format": INDEX_FORMAT, "version": INDEX_VERSION,
                    "embedding_model": embedding_model, "dim": dim,
                    "chunk_tokens": chunk_tokens, "overlap_tokens": overlap_tokens, "files": {}}
        return cls(manifest, [], faiss.IndexFlatIP(dim))

    @classmethod
    def load(cls, folder: str | Path) -> "RagIndex":
        import faiss

        from tunesmith.data.sources import read_records

        folder = Path(folder)
        if folder.exists() and not folder.is_dir():
            raise DataError(f"{folder}: a file, not an index folder; pass the folder `tunesmith rag index` wrote")
        if not folder.is_dir():
            raise DataError(f"{folder}: no such index folder; build one with "
                            f"`tunesmith rag index DOCS... --out {folder}`")
        manifest = _read_manifest(folder / MANIFEST)
        chunks = [r.fields for r in read_records(folder / CHUNKS)]
        try:
            vectors = faiss.read_index(str(folder / VECTORS))
        except RuntimeError:
            raise DataError(f"{folder / VECTORS}: missing or not a FAISS index file; rebuild the index") from None
        if vectors.ntotal != len(chunks) or vectors.d != manifest["dim"]:
            raise DataError(f"{folder}: the index is inconsistent ({vectors.ntotal} vectors of dimension {vectors.d}, "
                            f"{len(chunks)} chunks in {CHUNKS}, dim {manifest['dim']} in {MANIFEST}); rebuild it")
        return cls(manifest, chunks, vectors)

    @property
    def embedding_model(self) -> str:
        return self.manifest["embedding_model"]

    def check_embedder(self, name: str, dim: int, where: str | Path) -> None:
        if name != self.embedding_model or dim != self.manifest["dim"]:
            raise ConfigError(
                f"{where}: the index was built with the embedding model '{self.embedding_model}' "
                f"({self.manifest['dim']}-d), but '{name}' ({dim}-d) was asked for; vectors from different models "
                f"cannot be compared. Use --embedding-model {self.embedding_model}, or build a new index.")

    def check_chunk_settings(self, chunk_tokens: int | None, overlap_tokens: int | None, where: str | Path) -> None:
        for arg, value, key in (("--chunk-tokens", chunk_tokens, "chunk_tokens"),
                                ("--overlap-tokens", overlap_tokens, "overlap_tokens")):
            if value is not None and value != self.manifest[key]:
                raise ConfigError(f"{arg} {value}: {where} was built with {key}={self.manifest[key]}; one index "
                                  "keeps one chunking (leave the option out, or build a new index)")

    def is_unchanged(self, source_file) -> bool:
        known = self.manifest["files"].get(source_file.path)
        return bool(known) and known["sha256"] == source_file.sha256

    def pending(self, collected: Collected) -> list:
        """The files that are new or changed since they were indexed."""
        return [f for f in collected.files if not self.is_unchanged(f)]

    def add(self, collected: Collected, embedder, progress=None) -> IndexReport:
        """Chunk and embed new or changed files; unchanged ones (same SHA-256) are skipped. `embedder` may be
        None when nothing is pending."""
        import numpy as np

        report = IndexReport(skipped=list(collected.skipped))
        report.unchanged = [f.path for f in collected.files if self.is_unchanged(f)]
        todo = self.pending(collected)
        if todo:
            check_chunk_settings(self.manifest["chunk_tokens"], self.manifest["overlap_tokens"], embedder.max_tokens)
        new_chunks = []
        for source_file in todo:
            known = self.manifest["files"].get(source_file.path)
            if known:
                self._remove_file(source_file.path)
                report.updated.append(source_file.path)
            else:
                report.added.append(source_file.path)
            file_chunks = [
                {"file": source_file.path, "source": p.source, "start": c.start, "end": c.end,
                 "n_tokens": c.n_tokens, "text": p.text[c.start:c.end]}
                for p in source_file.passages
                for c in chunk_text(p.text, embedder.tokenizer, self.manifest["chunk_tokens"],
                                    self.manifest["overlap_tokens"])]
            self.manifest["files"][source_file.path] = {"sha256": source_file.sha256, "chunks": len(file_chunks)}
            new_chunks.extend(file_chunks)
        if new_chunks:
            task = progress.add_task("embedding chunks", total=len(new_chunks)) if progress else None
            advance = (lambda n: progress.advance(task, n)) if progress else None
            vectors = embedder.encode([c["text"] for c in new_chunks], progress=advance)
            self.vectors.add(np.ascontiguousarray(vectors, dtype="float32"))
            self.chunks.extend(new_chunks)
        report.chunks_added = len(new_chunks)
        return report

    def _remove_file(self, path: str) -> None:
        import numpy as np

        doomed = [i for i, c in enumerate(self.chunks) if c["file"] == path]
        self.vectors.remove_ids(np.array(doomed, dtype="int64"))  # IndexFlat compacts, keeping the order
        self.chunks = [c for c in self.chunks if c["file"] != path]
        del self.manifest["files"][path]

    def save(self, folder: str | Path) -> Path:
        import faiss

        with atomic_folder(folder) as tmp:
            (tmp / MANIFEST).write_text(json.dumps(self.manifest, indent=2, ensure_ascii=False) + "\n",
                                        encoding="utf-8")
            with open(tmp / CHUNKS, "w", encoding="utf-8") as fh:
                for c in self.chunks:
                    fh.write(json.dumps(c, ensure_ascii=False) + "\n")
            faiss.write_index(self.vectors, str(tmp / VECTORS))
        return Path(folder)

    def search(self, query_vectors, k: int) -> list[list[tuple[int, float]]]:
        """For each query row: up to k (chunk position, cosine similarity), best first."""
        import numpy as np

        if self.vectors.ntotal == 0:
            return [[] for _ in range(len(query_vectors))]
        scores, ids = self.vectors.search(np.ascontiguousarray(query_vectors, dtype="float32"),
                                          min(k, self.vectors.ntotal))
        return [[(int(i), float(s)) for i, s in zip(row_ids, row_scores) if i >= 0]
                for row_ids, row_scores in zip(ids, scores)]


def _read_manifest(path: Path) -> dict:
    if not path.is_file():
        raise DataError(f"{path.parent}: not a tunesmith RAG index (no {MANIFEST}); build one with "
                        f"`tunesmith rag index DOCS... --out {path.parent}`")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        line = getattr(e, "lineno", "?")
        raise DataError(f"{path}:{line}: malformed manifest ({e}); rebuild the index") from None
    if not isinstance(manifest, dict) or manifest.get("format") != INDEX_FORMAT:
        raise DataError(f"{path}: not a tunesmith RAG index manifest (expected \"format\": \"{INDEX_FORMAT}\")")
    if manifest.get("version") != INDEX_VERSION:
        raise DataError(f"{path}: index version {manifest.get('version')!r}; this tunesmith reads version "
                        f"{INDEX_VERSION}; rebuild the index")
    return manifest
