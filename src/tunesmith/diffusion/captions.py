"""Captions for text-to-image fine-tuning: which caption belongs to which image in a captioned image folder, and
caption dropout at training time.

A captioned folder holds images (SUFFIXES, in subfolders too; names starting with "." are skipped) and their
captions, in any of these sources, as the tools people use write them:

- `metadata.jsonl`: one JSON object per line, `{"file_name": "0001.png", "text": "a caption"}` — the layout of
  Hugging Face's ImageFolder that diffusers' train_text_to_image(_lora).py reads. The caption field is `text` unless
  `caption_column` names another (diffusers' --caption_column). Other fields are ignored.
- `metadata.csv` (ImageFolder's other form) or `captions.csv`: a header row with `file_name` and the caption column,
  then one row per image (UTF-8, an Excel BOM allowed, quoted fields may span lines: a row's line in messages is its
  last). Both table forms are read by tunesmith.data.sources.read_records.
- A caption file beside each image, named like it with `caption_extension` (`.txt` by default): `0001.png` →
  `0001.txt` (kohya-ss sd-scripts, SimpleTuner, ai-toolkit). Its first non-empty line is the caption, as kohya reads
  it; files with more lines are warned about once.

A table may sit in any subfolder; its `file_name`s are relative to the table's own folder (as ImageFolder reads
them), `/` or `\\` separated, and may not leave the captioned folder.

Precedence: none is needed, because sources never silently override each other. Every source that names an image
must give it the same caption (compared with surrounding whitespace stripped); two that differ are a DataError naming
both places (`metadata.jsonl:3` and `0001.txt`). So a folder may mix sources (a table for some images, `.txt` files
for others) and a `.txt` may repeat its table row, but a caption is never chosen behind the user's back.

Errors name the file (and line) and what is expected: a table row naming a file that is not there or not an image,
a row without `file_name` or the caption column, the same image twice in one table, an image no source captions
(each named), a folder with no images. Images Pillow cannot open are skipped with one warning; a caption that is
empty (the image trains unconditionally) is warned about once.

Records come back sorted by their path relative to the folder (POSIX form), so the order is the same on every
machine and every run. Each carries the image's size (width, height) as it will load: EXIF orientation applied,
read from the header only (a file whose pixel data is truncated passes here and fails when loaded)."""

from __future__ import annotations

import posixpath
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from tunesmith.data.sources import read_records
from tunesmith.diffusion.images import SUFFIXES
from tunesmith.errors import ConfigError, DataError

TABLES = ("metadata.jsonl", "metadata.csv", "captions.csv")
ROW_EXAMPLE = '{"file_name": "0001.png", "text": "a caption"}'


@dataclass(frozen=True)
class CaptionedImage:
    path: Path                # the image file (the folder as given, joined with its relative path)
    caption: str              # stripped of surrounding whitespace; "" trains unconditionally
    size: tuple[int, int]     # (width, height) as loaded, EXIF orientation applied


def read_captioned_folder(folder: str | Path, caption_column: str = "text", caption_extension: str = ".txt",
                          warn=None) -> list[CaptionedImage]:
    """Every readable image of `folder` with its caption, sorted by relative path (see the module's docstring)."""
    warn = warn or (lambda msg: print(f"warning: {msg}", file=sys.stderr))
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"{folder}: not a folder; expected a folder of images with captions ({_sources_hint(caption_extension)})")
    extension = caption_extension if caption_extension.startswith(".") else f".{caption_extension}"
    files = _files(folder)
    images = sorted(rel for rel in files if posixpath.splitext(rel)[1].lower() in SUFFIXES)
    found: dict[str, list[tuple[str, str]]] = {rel: [] for rel in images}  # image → [(caption, where)]
    for rel in sorted(files):
        if posixpath.basename(rel) in TABLES:
            for image, caption, where in _read_table(folder, rel, caption_column):
                _check_named(folder, files, found, image, where)
                found[image].append((caption, where))
    multi_line = []
    for rel in images:
        sidecar = posixpath.splitext(rel)[0] + extension
        if sidecar in files:
            caption, lines = _read_sidecar(folder / sidecar)
            found[rel].append((caption, str(folder / sidecar)))
            if lines > 1:
                multi_line.append(sidecar)
    if multi_line:
        warn(f"{len(multi_line)} caption file(s) hold several lines; the first line is the caption: "
             f"{_few(multi_line)}")
    sizes = {rel: _size(folder / rel) for rel in images}
    unreadable = [rel for rel in images if sizes[rel] is None]
    readable = [rel for rel in images if sizes[rel] is not None]
    if not readable:
        held = f"its {len(unreadable)} image file(s) cannot be opened: {_few(unreadable)}" if unreadable else "it holds no images"
        raise DataError(f"{folder}: {held}; expected images ({', '.join(SUFFIXES)}) with captions "
                        f"({_sources_hint(extension)})")
    if unreadable:
        warn(f"{folder}: skipped {len(unreadable)} file(s) Pillow cannot open as images: {_few(unreadable)}")
    uncaptioned = [rel for rel in readable if not found[rel]]
    if uncaptioned:
        raise DataError(f"{folder}: {len(uncaptioned)} image(s) have no caption: {_few(uncaptioned)}; expected a row "
                        f"for each in a caption table or a caption file beside it ({_sources_hint(extension)})")
    records = []
    for rel in readable:
        (caption, where), *others = found[rel]
        for other, other_where in others:
            if other != caption:
                raise DataError(f"{folder / rel}: two captions disagree: {where} says {caption!r}, {other_where} says "
                                f"{other!r}; expected one caption per image: remove one or make them equal")
        records.append(CaptionedImage(folder / rel, caption, sizes[rel]))
    empty = [str(r.path.relative_to(folder).as_posix()) for r in records if not r.caption]
    if empty:
        warn(f"{folder}: {len(empty)} image(s) have an empty caption (they train unconditionally): {_few(empty)}")
    return records


def drop_captions(captions: list[str], p: float, generator: torch.Generator) -> list[str]:
    """Caption dropout (for classifier-free guidance): each caption becomes "" with probability p. Draws
    len(captions) uniforms from `generator` when p > 0, nothing when p == 0."""
    if not 0.0 <= p <= 1.0:
        raise ConfigError(f"caption dropout: {p}; expected a probability in [0, 1]")
    if p == 0.0:
        return list(captions)
    drop = torch.rand(len(captions), generator=generator) < p
    return ["" if d else c for c, d in zip(captions, drop.tolist())]


def _files(folder: Path) -> set[str]:
    out = set()
    for path in folder.rglob("*"):
        rel = path.relative_to(folder)
        if not any(part.startswith(".") for part in rel.parts) and path.is_file():
            out.add(rel.as_posix())
    return out


def _few(names: list[str], n: int = 5) -> str:
    names = sorted(names)
    return ", ".join(names[:n]) + (f", … ({len(names) - n} more)" if len(names) > n else "")


def _sources_hint(extension: str) -> str:
    return f"metadata.jsonl rows like {ROW_EXAMPLE}, a metadata.csv/captions.csv with file_name,text, or a {extension} file named like each image"


def _read_table(folder: Path, rel: str, column: str):
    """(image path relative to `folder`, caption, "file:line") for each row of one caption table."""
    path = folder / rel
    base = posixpath.dirname(rel)
    records = read_records(path)
    if rel.endswith(".csv"):
        missing = [c for c in ("file_name", column) if c not in records[0].fields]
        if missing:
            raise DataError(f"{path}:1: the header has no {' or '.join(repr(c) for c in missing)} column (it has: "
                            f"{', '.join(records[0].fields)}); expected file_name and the caption column {column!r}")
    seen: dict[str, str] = {}
    for record in records:
        name, caption = _row_fields(record.fields, record.where, column)
        image = posixpath.normpath(posixpath.join(base, name.replace("\\", "/")))
        if posixpath.isabs(name.replace("\\", "/")) or image == ".." or image.startswith("../"):
            raise DataError(f"{record.where}: file_name {name!r} is outside {folder}; expected a path relative to "
                            f"{folder / base if base else folder}")
        if image in seen:
            raise DataError(f"{record.where}: file_name {name!r} is listed again (first at {seen[image]}); expected "
                            "one row per image")
        seen[image] = record.where
        yield image, caption.strip(), record.where


def _row_fields(row: dict, where: str, column: str) -> tuple[str, str]:
    name, caption = row.get("file_name"), row.get(column)
    if not isinstance(name, str) or not name.strip():
        got = "no file_name" if name is None else f"file_name {name!r}"
        raise DataError(f"{where}: {got}; expected the image's path relative to the table, as in {ROW_EXAMPLE}")
    if caption is None:
        if column in row:  # a CSV row with fewer values than the header
            raise DataError(f"{where}: no value in the {column!r} column; expected file_name,{column} on every row")
        fields = ", ".join(k for k in row if k is not None)
        raise DataError(f"{where}: no {column!r} field (it has: {fields}); expected the caption in {column!r} "
                        f"(the caption column)")
    if not isinstance(caption, str):
        raise DataError(f"{where}: {column!r} is a {type(caption).__name__}; expected the caption as a string")
    return name.strip(), caption


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start}); expected a UTF-8 file") from None


def _read_sidecar(path: Path) -> tuple[str, int]:
    """(first non-empty line stripped, number of non-empty lines)."""
    lines = [line.strip() for line in _read_text(path).splitlines() if line.strip()]
    return (lines[0] if lines else ""), len(lines)


def _check_named(folder: Path, files: set[str], found: dict, image: str, where: str) -> None:
    if image in found:
        return
    if image in files:
        raise DataError(f"{where}: {image} is not an image; expected a file ending in one of {', '.join(SUFFIXES)}")
    raise DataError(f"{where}: {folder / image} does not exist; expected file_name to name an image in {folder}")


def _size(path: Path) -> tuple[int, int] | None:
    from PIL import Image

    try:
        with Image.open(path) as im:
            w, h = im.size
            orientation = im.getexif().get(0x0112, 1)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
        return None
    return (h, w) if orientation in (5, 6, 7, 8) else (w, h)
