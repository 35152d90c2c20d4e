"""Find and read the documents to index: text, Markdown, reST and JSONL; empty or binary files are skipped."""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path

from tunesmith.errors import DataError

TEXT_SUFFIXES = (".txt", ".text", ".md", ".markdown", ".rst")
JSONL_SUFFIXES = (".jsonl",)
SUPPORTED = TEXT_SUFFIXES + JSONL_SUFFIXES


@dataclass
class Passage:
    """One indexable text: a whole text file, or one JSONL record (source then reads "file:line")."""

    source: str
    text: str


@dataclass
class SourceFile:
    path: str  # as stored in the index: relative to the working directory when inside it
    sha256: str
    passages: list[Passage]


@dataclass
class Skipped:
    path: str
    reason: str


@dataclass
class Collected:
    files: list[SourceFile] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)


def display_path(path: Path) -> str:
    resolved = path.resolve()
    try:
        return resolved.relative_to(Path.cwd().resolve()).as_posix()
    except ValueError:
        return resolved.as_posix()


def expand_paths(arguments: list[str]) -> tuple[list[Path], list[Skipped]]:
    """Files named directly, plus the supported files found (recursively, sorted) under named folders."""
    paths, skipped = [], []
    for arg in arguments:
        p = Path(arg)
        if not p.exists():
            raise DataError(f"{arg}: no such file or folder (rag index takes files or folders of documents)")
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.is_file() and _suffix(f) in SUPPORTED
                           and not any(part.startswith(".") for part in f.relative_to(p).parts))
            paths.extend(found)
        elif _suffix(p) in SUPPORTED:
            paths.append(p)
        else:
            skipped.append(Skipped(display_path(p), f"unsupported file type '{p.suffix}'; expected "
                                   + ", ".join(SUPPORTED)))
    return paths, skipped


def _suffix(path: Path) -> str:
    name = path.name.lower()
    return ".rst" if name.endswith(".rst.txt") else path.suffix.lower()


def _decode(path: Path, data: bytes) -> str | Skipped:
    where = display_path(path)
    if b"\x00" in data[:8192]:
        return Skipped(where, "binary file (NUL bytes)")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        return Skipped(where, f"not UTF-8 text (byte {e.start})")
    if not text.strip():
        return Skipped(where, "empty")
    return text


def _jsonl_passages(path: Path) -> list[Passage]:
    from tunesmith.data.chat import Chat
    from tunesmith.data.formats import normalize_all
    from tunesmith.data.sources import read_records

    _, items = normalize_all(read_records(path))
    passages = []
    for item in items:
        text = "\n\n".join(m["content"] for m in item.messages) if isinstance(item, Chat) else item.text
        line = item.where.rsplit(":", 1)[1]
        if text.strip():
            passages.append(Passage(f"{display_path(path)}:{line}", text))
    return passages


def read_document(path: Path) -> SourceFile | Skipped:
    data = path.read_bytes()
    decoded = _decode(path, data)
    if isinstance(decoded, Skipped):
        return decoded
    where = display_path(path)
    if _suffix(path) in JSONL_SUFFIXES:
        passages = _jsonl_passages(path)
        if not passages:
            return Skipped(where, "no record has any text")
    else:
        passages = [Passage(where, decoded)]
    return SourceFile(where, hashlib.sha256(data).hexdigest(), passages)


def collect(arguments: list[str], exclude: str | Path | None = None) -> Collected:
    """Read every document named or found; files under `exclude` (the index being written) are ignored."""
    paths, skipped = expand_paths(arguments)
    out = Collected(skipped=skipped)
    seen = {os.path.realpath(exclude)} if exclude is not None else set()
    for p in paths:
        key = os.path.realpath(p)
        if key in seen or (exclude is not None and Path(key).is_relative_to(os.path.realpath(exclude))):
            continue
        seen.add(key)
        result = read_document(p)
        (out.skipped if isinstance(result, Skipped) else out.files).append(result)
    return out
