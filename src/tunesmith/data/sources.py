"""Read records from JSONL, Parquet, CSV or a `datasets.save_to_disk` folder, keeping where each came from."""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tunesmith.errors import DataError
from tunesmith.paths import DATASETS_MARKERS


@dataclass
class Record:
    fields: dict[str, Any]
    where: str  # "file:line" (or "folder#row") for error messages


def _read_jsonl(path: Path) -> list[Record]:
    records = []
    with open(path, "rb") as fh:
        for lineno, raw in enumerate(fh, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"{path}:{lineno}: not valid UTF-8 (byte {e.start}); re-encode the file as UTF-8") from None
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno}: malformed JSON ({e.msg} at column {e.colno}); each line must be one JSON object") from None
            if not isinstance(obj, dict):
                raise DataError(f"{path}:{lineno}: expected a JSON object, got {type(obj).__name__}")
            records.append(Record(obj, f"{path}:{lineno}"))
    return records


def _read_csv(path: Path) -> list[Record]:
    try:
        with open(path, newline="", encoding="utf-8-sig") as fh:  # a BOM (Excel's "CSV UTF-8") is not part of the header
            reader = csv.DictReader(fh)
            # line numbers: the header is line 1, so the first row is line 2 (multi-line cells shift later ones)
            return [Record(dict(row), f"{path}:{reader.line_num}") for row in reader]
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not valid UTF-8 (byte offset {e.start}); re-encode the file as UTF-8") from None
    except csv.Error as e:
        raise DataError(f"{path}: malformed CSV: {e}") from None


def _read_parquet(path: Path) -> list[Record]:
    import pyarrow.parquet as pq

    try:
        rows = pq.read_table(path).to_pylist()
    except Exception as e:
        raise DataError(f"{path}: could not read Parquet: {e}") from None
    return [Record(row, f"{path}#row{i}") for i, row in enumerate(rows)]


def _read_hf_disk(path: Path) -> list[Record]:
    from datasets import DatasetDict, load_from_disk

    try:
        ds = load_from_disk(str(path))
    except Exception as e:
        raise DataError(f"{path}: could not load a `datasets` folder: {e}") from None
    if isinstance(ds, DatasetDict):
        if "train" not in ds:
            raise DataError(f"{path}: a DatasetDict without a 'train' split (has {list(ds)}); point at one split's folder")
        ds = ds["train"]
    return [Record(dict(row), f"{path}#row{i}") for i, row in enumerate(ds)]


def read_records(path: str | Path) -> list[Record]:
    p = Path(path)
    if not p.exists():
        raise DataError(f"{p}: data file not found")
    if p.is_dir():
        if any((p / marker).is_file() for marker in DATASETS_MARKERS):
            return _read_hf_disk(p)
        raise DataError(f"{p}: a folder, but not one written by `datasets.save_to_disk` (no dataset_info.json)")
    suffix = p.suffix.lower()
    readers = {".jsonl": _read_jsonl, ".json": _read_jsonl, ".csv": _read_csv, ".parquet": _read_parquet}
    if suffix not in readers:
        raise DataError(f"{p}: unsupported file type '{suffix}'; expected .jsonl, .parquet, .csv or a datasets folder")
    records = readers[suffix](p)
    if not records:
        raise DataError(f"{p}: holds no records")
    return records


def read_many(paths: str | list[str]) -> list[Record]:
    paths = [paths] if isinstance(paths, str) else paths
    out: list[Record] = []
    for p in paths:
        out.extend(read_records(p))
    return out
